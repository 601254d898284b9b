//! Minimal, allocation-free parsing of what Streamgate sends: HTTP/1.1 chunked framing, SSE
//! blocks and JSON envelopes (WebSocket text / NDJSON lines).
//!
//! The load tool must parse hundreds of thousands of events per second on a core it shares with
//! the server, so it does not deserialize JSON: it finds the few fields it needs by their key.

use memchr::memmem;

/// What one event carried, as far as the benchmark cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ev<'a> {
    /// A change with the benchmark document's `seq` and `sentAt` (unix µs), and its id.
    Change {
        seq: i64,
        sent_at: i64,
        id: Option<&'a [u8]>,
    },
    /// A change that is not a benchmark document (no `seq`/`sentAt`).
    Foreign,
    /// A control event (`error`, `cancel`, ...): name and data.
    Control { name: &'a [u8], data: &'a [u8] },
}

/// Finds `"key":<integer>` and parses the integer.
pub fn find_i64(hay: &[u8], key: &[u8]) -> Option<i64> {
    let at = memmem::find(hay, key)? + key.len();
    let rest = &hay[at..];
    let (neg, digits) = match rest.first()? {
        b'-' => (true, &rest[1..]),
        _ => (false, rest),
    };
    let mut value: i64 = 0;
    let mut any = false;
    for &b in digits {
        if !b.is_ascii_digit() {
            break;
        }
        any = true;
        value = value.checked_mul(10)?.checked_add(i64::from(b - b'0'))?;
    }
    any.then_some(if neg { -value } else { value })
}

fn change_from_data<'a>(data: &[u8], id: Option<&'a [u8]>) -> Ev<'a> {
    match (find_i64(data, b"\"seq\":"), find_i64(data, b"\"sentAt\":")) {
        (Some(seq), Some(sent_at)) => Ev::Change { seq, sent_at, id },
        _ => Ev::Foreign,
    }
}

/// Parses one SSE block (the lines between two blank lines). `None` for comments and `retry:`.
pub fn sse_block(block: &[u8]) -> Option<Ev<'_>> {
    let mut id = None;
    let mut name: &[u8] = b"message";
    let mut data: Option<&[u8]> = None;
    for line in block.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(v) = line.strip_prefix(b"data:") {
            data = Some(v.strip_prefix(b" ").unwrap_or(v));
        } else if let Some(v) = line.strip_prefix(b"event:") {
            name = v.strip_prefix(b" ").unwrap_or(v);
        } else if let Some(v) = line.strip_prefix(b"id:") {
            id = Some(v.strip_prefix(b" ").unwrap_or(v));
        }
    }
    let data = data?;
    // The connect-time `info` and `heartbeats=true` events are not changes nor failures, nor
    // are a snapshot's documents and its `ready` (the benchmark documents are inserted later).
    if matches!(name, b"info" | b"heartbeat" | b"snapshot" | b"ready") {
        return None;
    }
    if name == b"change" {
        Some(change_from_data(data, id.filter(|v| !v.is_empty())))
    } else {
        Some(Ev::Control { name, data })
    }
}

/// Parses an envelope `{"event":"…","id":"…","data":{…}}`. `None` for an empty line.
pub fn envelope(text: &[u8]) -> Option<Ev<'_>> {
    let text = text.strip_suffix(b"\r").unwrap_or(text);
    if text.is_empty() {
        return None;
    }
    // Not anchored at `{`: a multi-stream envelope starts with `"stream"` (the first match is
    // still the envelope's, which comes before `data`).
    let name = quoted_after(text, b"\"event\":\"").unwrap_or(b"");
    if name == b"info" || name == b"heartbeat" {
        return None;
    }
    if name != b"change" {
        let data = memmem::find(text, b"\"data\":").map_or(text, |at| &text[at + 7..]);
        return Some(Ev::Control { name, data });
    }
    let id = quoted_after(text, b",\"id\":\"");
    let data_at = memmem::find(text, b"\"data\":").map_or(0, |at| at + 7);
    Some(change_from_data(&text[data_at..], id))
}

/// The string value right after `prefix` (up to the next `"`; ids and names have no escapes).
fn quoted_after<'a>(text: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    let start = memmem::find(text, prefix)? + prefix.len();
    let len = memchr::memchr(b'"', &text[start..])?;
    Some(&text[start..start + len])
}

/// State of HTTP/1.1 chunked decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunked {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk with this many bytes left.
    Data(usize),
    /// Expecting the CRLF after a chunk.
    Crlf,
    /// Saw the last (zero-size) chunk.
    End,
    /// Not chunked: the body is the rest of the connection.
    Identity,
}

/// Moves decoded body bytes from `raw[*pos..]` to `out`; advances `*pos` past what was used.
pub fn dechunk(
    state: &mut Chunked,
    raw: &[u8],
    pos: &mut usize,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    loop {
        let rest = &raw[*pos..];
        match *state {
            Chunked::End => return Ok(()),
            Chunked::Identity => {
                out.extend_from_slice(rest);
                *pos = raw.len();
                return Ok(());
            }
            Chunked::Size => {
                let Some(eol) = memmem::find(rest, b"\r\n") else {
                    if rest.len() > 1024 {
                        return Err("chunk size line too long".into());
                    }
                    return Ok(());
                };
                let line = &rest[..eol];
                let hex = line.split(|&b| b == b';').next().unwrap_or(line);
                let text = std::str::from_utf8(hex).map_err(|_| "bad chunk size")?;
                let size = usize::from_str_radix(text.trim(), 16)
                    .map_err(|_| format!("bad chunk size {text:?}"))?;
                *pos += eol + 2;
                *state = if size == 0 {
                    Chunked::End
                } else {
                    Chunked::Data(size)
                };
            }
            Chunked::Data(left) => {
                if rest.is_empty() {
                    return Ok(());
                }
                let take = left.min(rest.len());
                out.extend_from_slice(&rest[..take]);
                *pos += take;
                *state = if take == left {
                    Chunked::Crlf
                } else {
                    Chunked::Data(left - take)
                };
            }
            Chunked::Crlf => {
                if rest.len() < 2 {
                    return Ok(());
                }
                if &rest[..2] != b"\r\n" {
                    return Err("missing CRLF after chunk".into());
                }
                *pos += 2;
                *state = Chunked::Size;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sse_change() {
        let block = b"id: 82AB\nevent: change\ndata: {\"operationType\":\"insert\",\"fullDocument\":{\"_id\":{\"$oid\":\"x\"},\"seq\":42,\"sentAt\":1700000000000001}}";
        assert_eq!(
            sse_block(block),
            Some(Ev::Change {
                seq: 42,
                sent_at: 1_700_000_000_000_001,
                id: Some(b"82AB".as_slice())
            })
        );
        assert_eq!(sse_block(b"retry: 2000"), None);
        assert_eq!(sse_block(b": keep-alive"), None);
    }

    #[test]
    fn parses_envelopes() {
        let text = b"{\"event\":\"change\",\"id\":\"82CD\",\"data\":{\"fullDocument\":{\"seq\":-1,\"sentAt\":5}}}";
        assert_eq!(
            envelope(text),
            Some(Ev::Change {
                seq: -1,
                sent_at: 5,
                id: Some(b"82CD".as_slice())
            })
        );
        let err = b"{\"event\":\"error\",\"data\":{\"code\":\"slow_consumer\"}}";
        assert!(matches!(
            envelope(err),
            Some(Ev::Control { name: b"error", .. })
        ));
        assert_eq!(envelope(b""), None);
    }

    #[test]
    fn dechunks_across_reads() {
        let raw = b"5\r\nhello\r\n3;x=y\r\nabc\r\n0\r\n\r\n";
        for split in 0..raw.len() {
            let mut state = Chunked::Size;
            let mut out = Vec::new();
            let mut buf = raw[..split].to_vec();
            let mut pos = 0;
            dechunk(&mut state, &buf, &mut pos, &mut out).unwrap();
            buf.drain(..pos);
            buf.extend_from_slice(&raw[split..]);
            let mut pos = 0;
            dechunk(&mut state, &buf, &mut pos, &mut out).unwrap();
            assert_eq!(out, b"helloabc", "split at {split}");
            assert_eq!(state, Chunked::End);
        }
    }
}
