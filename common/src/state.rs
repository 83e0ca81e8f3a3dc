//! The states of jobs, chunks and results, and the roles of API tokens, as Postgres stores them (text, held to these values by CHECK constraints in migrations 0007 and 0009).

use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgArgumentBuffer, PgTypeInfo, PgValueRef};
use sqlx::{Decode, Encode, Postgres, Type};

/// A state name Postgres holds that this version does not know.
#[derive(Debug, thiserror::Error)]
#[error("unknown {what} state {found:?}")]
pub struct UnknownState {
    pub what: &'static str,
    pub found: String,
}

/// Declares an enum stored as one of a fixed set of text values.
macro_rules! text_states {
    ($(#[$meta:meta])* $name:ident, $what:literal { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant),+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = UnknownState;
            fn from_str(s: &str) -> Result<Self, UnknownState> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(UnknownState { what: $what, found: s.to_string() }),
                }
            }
        }

        impl Type<Postgres> for $name {
            fn type_info() -> PgTypeInfo {
                <str as Type<Postgres>>::type_info()
            }
            fn compatible(ty: &PgTypeInfo) -> bool {
                <str as Type<Postgres>>::compatible(ty)
            }
        }

        impl<'r> Decode<'r, Postgres> for $name {
            fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
                Ok(<&str as Decode<Postgres>>::decode(value)?.parse()?)
            }
        }

        impl Encode<'_, Postgres> for $name {
            fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
                <&str as Encode<Postgres>>::encode(self.as_str(), buf)
            }
        }
    };
}

text_states! {
    /// `jobs.state`: uploading -> running -> completed | cancelled;
    /// uploading -> rejected | abandoned; completed | cancelled -> running (resume);
    /// running -> paused (budget cap) -> running (resume).
    JobState, "job" {
        Uploading = "uploading",
        Running = "running",
        /// Stopped at its budget cap; `resume --max-cost` raises the cap and goes on.
        Paused = "paused",
        Completed = "completed",
        Cancelled = "cancelled",
        /// The input was refused (invalid lines without --skip-invalid, too large).
        Rejected = "rejected",
        /// The upload never finished.
        Abandoned = "abandoned",
    }
}

text_states! {
    /// `chunks.state`: pending -> done (pending again on resume).
    ChunkState, "chunk" {
        Pending = "pending",
        Done = "done",
    }
}

text_states! {
    /// `jobs.mode` (migration 0014): how a job's calls are made.
    JobMode, "job mode" {
        /// One live call per item, under the shared rate limit.
        Live = "live",
        /// Each chunk's items as one provider batch (OpenAI's Batch API,
        /// Anthropic's Message Batches): half the price, answered within hours.
        Batch = "batch",
        /// Batch for the bulk; live for what a batch did not answer, for
        /// small remainders, and for whatever is left near the deadline.
        Auto = "auto",
    }
}

#[allow(clippy::derivable_impls)] // the enum comes from a macro shared with states that have no default
impl Default for JobMode {
    fn default() -> Self {
        JobMode::Live
    }
}

impl JobMode {
    /// Whether the job's calls go through provider batches at all.
    pub fn batches(self) -> bool {
        self != JobMode::Live
    }
}

text_states! {
    /// `results.state`.
    ResultState, "result" {
        Succeeded = "succeeded",
        /// Succeeded with a confidence below the job's review threshold.
        NeedsReview = "needs_review",
        /// A reviewer's decision replaced the model's answer or confirmed it.
        Reviewed = "reviewed",
        Failed = "failed",
    }
}

text_states! {
    /// `api_tokens.role`, least to most: each role may do what the one
    /// before it may, and more (the table is `coordinator::auth::ENDPOINTS`).
    Role, "role" {
        /// Status, results and the list of jobs.
        Reader = "reader",
        /// Also submit, cancel and resume jobs.
        Submitter = "submitter",
        /// Also export the review queue and import decisions.
        Reviewer = "reviewer",
        /// Also manage tokens, in every project.
        Admin = "admin",
    }
}

impl Role {
    /// Position in the ladder reader < submitter < reviewer < admin.
    pub fn rank(self) -> usize {
        Role::ALL.iter().position(|r| *r == self).expect("every role is in ALL")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_read_back_from_their_text() {
        for s in JobState::ALL {
            assert_eq!(s.as_str().parse::<JobState>().unwrap(), *s);
        }
        for s in ChunkState::ALL {
            assert_eq!(s.as_str().parse::<ChunkState>().unwrap(), *s);
        }
        for s in ResultState::ALL {
            assert_eq!(s.as_str().parse::<ResultState>().unwrap(), *s);
            assert_eq!(serde_json::to_string(s).unwrap(), format!("\"{}\"", s.as_str()));
        }
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>().unwrap(), *r);
        }
        assert!(Role::Reader.rank() < Role::Submitter.rank() && Role::Reviewer.rank() < Role::Admin.rank());
        assert!("finished".parse::<JobState>().unwrap_err().to_string().contains("unknown job state"));
    }
}
