//! The HTTP edge: the direct SSE/NDJSON path (request heads in odd shapes, pipelining,
//! half-close, HTTP/1.0, partial writes), the stream end with frames queued, and the
//! harness's own guarantee that a server panic fails the test.

use std::time::Duration;

use mongodb::bson::doc;

use crate::harness::clients::{Kind, Next};
use crate::harness::fixture::Fixture;

const WAIT: Duration = Duration::from_secs(10);

/// A stream that ends (here: `invalidate` after a dropped collection) while the last batch is
/// still being drained must end cleanly. It used to poll the finished body again, a panic in
/// the connection task that only the harness's panic record makes visible.
#[tokio::test]
async fn stream_end_with_frames_queued_does_not_panic() {
    let f = Fixture::start("edge_end", |_| {}).await;
    for kind in [Kind::Sse, Kind::Ndjson] {
        let mut client = f.connect(kind).await;
        f.coll
            .insert_many((0..5).map(|seq| doc! { "seq": seq }))
            .await
            .unwrap();
        f.coll.drop().await.unwrap();
        let mut events = Vec::new();
        loop {
            match client.next(WAIT).await {
                Next::Event(e) => events.push(e.event),
                Next::End(_) => break,
                Next::Timeout => panic!("{kind:?}: no end after {events:?}"),
            }
        }
        // Five inserts, the drop, then the terminal `invalidate`.
        assert_eq!(events.len(), 7, "{kind:?}: {events:?}");
        assert_eq!(events.last().map(String::as_str), Some("invalidate"));
    }
    f.server.stop().await;
}
