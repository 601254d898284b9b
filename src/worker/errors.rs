//! Sorting MongoDB errors into "retry from the last token" and "tell the clients".

use mongodb::error::{Error, ErrorKind};

/// `ChangeStreamHistoryLost`: the resume point is no longer in the oplog.
const HISTORY_LOST: i32 = 286;
/// `ChangeStreamFatalError`: also raised when a resume token is not found in the oplog.
const CHANGE_STREAM_FATAL: i32 = 280;

/// Server error codes that mean "this node is unavailable for now" (SDAM's not-primary,
/// recovering and shutting-down codes, network codes, cursor loss). `Interrupted` (11601) and
/// `CursorKilled` (237): somebody ended our operation or cursor (`killOp`, `killCursors`; in
/// relay mode, a new owner ending what it took for a killed owner's cursor): reopening from
/// our position is the answer, not ending the stream.
const TRANSIENT_CODES: &[i32] = &[
    6, 7, 43, 63, 89, 91, 133, 134, 150, 189, 234, 237, 262, 9001, 10107, 11600, 11601, 11602,
    13388, 13435, 13436,
];

/// What to do about an error from the change-stream cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Network, election, restart: reopen from the last token after a backoff.
    Retry,
    /// The resume point is older than the oplog.
    HistoryLost(String),
    /// The request itself is wrong (bad pipeline, bad token): tell the client.
    Fatal(String),
}

/// The server error code, if the error came from the server.
pub fn server_code(error: &Error) -> Option<i32> {
    match error.kind.as_ref() {
        ErrorKind::Command(command) => Some(command.code),
        _ => None,
    }
}

/// Classifies a cursor error.
pub fn classify(error: &Error) -> Disposition {
    let Some(code) = server_code(error) else {
        // Not a server reply: I/O, server selection, pool cleared, … all pass with time.
        return Disposition::Retry;
    };
    let message = match error.kind.as_ref() {
        ErrorKind::Command(command) => command.message.clone(),
        _ => error.to_string(),
    };
    if code == HISTORY_LOST
        || (code == CHANGE_STREAM_FATAL && message.contains("resume token was not found"))
    {
        return Disposition::HistoryLost(message);
    }
    if TRANSIENT_CODES.contains(&code) || error.contains_label("ResumableChangeStreamError") {
        return Disposition::Retry;
    }
    Disposition::Fatal(message)
}
