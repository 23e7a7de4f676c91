//! Reading an instance's log from the cloud.

use serde::{Deserialize, Serialize};

/// Most log bytes one answer carries; `--follow` asks again from the returned offset.
pub const MAX_LOG_CHUNK: u64 = 256 * 1024;

/// What the cloud asks of an instance's log (content of a Query on `namespace/log/name`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct LogQuery {
    /// Only the last this many lines (ignored when `offset` is given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail: Option<u64>,
    /// Bytes from this offset of the current log file on (for following).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

/// An agent's answer to a [`LogQuery`] (content of the Response).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct LogChunk {
    /// The log text (lossy UTF-8).
    pub text: String,
    /// Offset to ask from next time to get what follows.
    pub offset: u64,
}
