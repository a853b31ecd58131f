//! Integration tests of the adapters against real components: PostgreSQL processes,
//! local disk, a loop-mounted btrfs, OpenStack Swift, an S3 server and an EC2 emulator
//! (with loop devices for its volumes) started by `scripts/testbed`.

mod engine_postgres;
mod engine_postgres_backup;
mod pipeline;
mod snapshot_btrfs;
mod snapshot_ebs;
mod snapshot_ebs_volumes;
mod storage_conformance;
mod storage_faults;
mod storage_support;
mod storage_swift;
