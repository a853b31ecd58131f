//! Infrastructure: where an instance runs and where its volume lives.
//!
//! `local` runs each instance as a supervised process on this host with a volume
//! directory under the broker's data directory; on btrfs its volumes are subvolumes, and
//! backups can be snapshots of them (`btrfs`); on an EC2 host its volumes can be EBS
//! volumes, and backups EBS snapshots (`ebs`). An infrastructure never decides how a data
//! service is initialised or administered (that is its [`Engine`](crate::engine::Engine)),
//! and never lets a user's string become a path: volumes are named by validated IDs.

pub mod btrfs;
pub mod ebs;
pub mod host;
pub mod local;

// The engine module owns the types an instance is described by; they are re-exported
// here (one direction only) because the broker reaches them through its infrastructure.
pub use crate::engine::{Credentials, Endpoint, EngineKind};
pub use ebs::EbsHostConfig;
pub use local::{InstanceSpec, LocalConfig, LocalInfrastructure};
