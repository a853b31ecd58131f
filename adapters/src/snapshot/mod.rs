//! Infrastructure snapshots: the snapshot strategy's copies of an instance's volume,
//! kept where the volume lives and recorded in a backup's manifest as a
//! [`SnapshotRef`](crate::backup::SnapshotRef).
//!
//! A snapshot provider takes a snapshot tagged with the instance and backup it belongs to
//! (so that retention and crash recovery can find what a killed broker left), restores
//! one as a new volume, and deletes one idempotently. It must never report a snapshot as
//! taken before the provider says it is complete, and never report a deletion it did not
//! make (a snapshot in another region is refused, not "already gone").

pub mod ebs;
