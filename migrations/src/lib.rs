//! The Postgres schema of Sluice, embedded so every binary and test applies the same migrations.

/// All migrations under `migrations/sql`, applied in order by the coordinator at start-up and by test fixtures.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./sql");
