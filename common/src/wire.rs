//! The only payloads that cross NATS: chunk messages, which carry ids and never documents.
//!
//! A type here is part of a wire boundary shared by coordinators and workers of
//! different versions: change it only by adding optional fields.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// JetStream stream holding one message per chunk of work.
pub const STREAM: &str = "SLUICE_CHUNKS";
/// Every chunk subject starts with this; the job id follows.
pub const SUBJECT_PREFIX: &str = "sluice.chunks";
/// Durable pull consumer shared by all workers.
pub const CONSUMER: &str = "sluice-workers";

/// The subject a job's chunks are published on. One subject per job lets the
/// reconciler count a job's messages still in the stream.
pub fn chunk_subject(job_id: Uuid) -> String {
    format!("{SUBJECT_PREFIX}.{job_id}")
}

/// A unit of work: a contiguous range of item sequence numbers of one job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkMsg {
    pub job_id: Uuid,
    pub chunk_no: i32,
    pub first_seq: i64,
    pub last_seq: i64,
    /// Which publication of the chunk this is. A chunk reopened by the
    /// reconciler or by `resume` gets a new generation, and a worker drops a
    /// message older than the chunk's current one.
    #[serde(default)]
    pub generation: i32,
}

impl ChunkMsg {
    /// `Nats-Msg-Id` for this chunk. The generation changes only when a chunk
    /// is reopened, so a retried publish of the same generation is dropped by
    /// JetStream's duplicate window.
    pub fn msg_id(&self) -> String {
        format!("{}.{}.{}", self.job_id, self.chunk_no, self.generation)
    }

    pub fn item_count(&self) -> i64 {
        self.last_seq - self.first_seq + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msg_id_differs_by_generation_only() {
        let m = ChunkMsg { job_id: Uuid::nil(), chunk_no: 3, first_seq: 201, last_seq: 300, generation: 0 };
        assert_ne!(m.msg_id(), ChunkMsg { generation: 1, ..m }.msg_id());
        // Messages from before generations existed still decode.
        let old: ChunkMsg = serde_json::from_str(
            r#"{"job_id":"00000000-0000-0000-0000-000000000000","chunk_no":3,"first_seq":201,"last_seq":300}"#,
        )
        .unwrap();
        assert_eq!(old, m);
        assert_eq!(m.item_count(), 100);
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(serde_json::from_str::<ChunkMsg>(&json).unwrap(), m);
    }
}
