//! `streamgate init-replset`: initiate a single-node replica set (used by `scripts/mongo-local`
//! and the test harness, since the mongod we fetch comes without `mongosh`).

use std::time::Duration;

use mongodb::Client;
use mongodb::bson::doc;
use mongodb::options::ClientOptions;

use crate::worker::errors::server_code;

/// `NotYetInitialized`.
const NOT_YET_INITIALIZED: i32 = 94;
/// `AlreadyInitialized`.
const ALREADY_INITIALIZED: i32 = 23;

/// Initiates replica set `set_name` with the single member `host` (if not done yet) and waits
/// until that member is primary. Idempotent.
pub async fn initiate(
    uri: &str,
    set_name: &str,
    host: &str,
    timeout: Duration,
) -> Result<(), String> {
    let mut options = ClientOptions::parse(uri).await.map_err(|e| e.to_string())?;
    options.direct_connection = Some(true);
    options.server_selection_timeout = Some(Duration::from_secs(5));
    let client = Client::with_options(options).map_err(|e| e.to_string())?;
    let result = initiate_with(&client, set_name, host, timeout).await;
    // Ends the client's sessions while the runtime still runs: a client dropped as a short-lived
    // process exits spawns that work onto a runtime going away, and the driver panics there.
    client.shutdown().await;
    result
}

async fn initiate_with(
    client: &Client,
    set_name: &str,
    host: &str,
    timeout: Duration,
) -> Result<(), String> {
    let admin = client.database("admin");
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match admin.run_command(doc! { "replSetGetStatus": 1 }).await {
            Ok(_) => break,
            Err(error) if server_code(&error) == Some(NOT_YET_INITIALIZED) => {
                let config = doc! { "_id": set_name, "members": [ { "_id": 0, "host": host } ] };
                match admin.run_command(doc! { "replSetInitiate": config }).await {
                    Ok(_) => break,
                    Err(error) if server_code(&error) == Some(ALREADY_INITIALIZED) => break,
                    Err(error) => return Err(format!("replSetInitiate failed: {error}")),
                }
            }
            Err(error) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(%error, "waiting for mongod");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => return Err(format!("mongod did not answer: {error}")),
        }
    }
    loop {
        let hello = admin.run_command(doc! { "hello": 1 }).await;
        if let Ok(reply) = &hello
            && reply.get_bool("isWritablePrimary") == Ok(true)
        {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("{host} did not become primary in {timeout:?}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
