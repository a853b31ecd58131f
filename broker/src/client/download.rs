//! Writing a downloaded backup: chunk by chunk (never the whole backup in memory), with
//! its byte count and SHA-256 checked against what the broker announced.
//!
//! A file is written as `FILE.partial` and renamed to `FILE` only after every check
//! passed, so `FILE` is never an incomplete or altered backup; on any failure, Ctrl-C
//! included, the partial file is removed. On stdout the checks still run, and a failure is reported
//! after the bytes went out: the exit status is then the only signal, as with
//! `phoenix decrypt`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use aws_lc_rs::digest::{Context, SHA256};
use bytes::Bytes;
use futures::{Stream, StreamExt as _};
use tokio::io::{AsyncWrite, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

use super::render::Bar;
use crate::error::Error;

/// What the broker announced for a download.
#[derive(Debug, Clone)]
pub struct Expected {
    pub length: u64,
    /// Lowercase hex.
    pub sha256: String,
}

/// Copies `body` to `out`, then checks length and digest. Fails as soon as the body is
/// longer than announced.
///
/// # Errors
/// [`Error::Download`] on a length or digest mismatch, the body's own error when the
/// transfer breaks, [`Error::Io`] when writing fails.
pub async fn copy_checked<S, W>(
    body: S,
    expected: &Expected,
    out: &mut W,
    bar: &Bar,
) -> Result<(), Error>
where
    S: Stream<Item = Result<Bytes, Error>>,
    W: AsyncWrite + Unpin,
{
    let mut body = std::pin::pin!(body);
    let mut digest = Context::new(&SHA256);
    let mut received: u64 = 0;
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        received += chunk.len() as u64;
        if received > expected.length {
            return Err(Error::Download(format!(
                "the broker sent more than the announced {} bytes",
                expected.length
            )));
        }
        digest.update(&chunk);
        out.write_all(&chunk)
            .await
            .map_err(|e| Error::io("writing the download", e))?;
        bar.add(chunk.len() as u64);
    }
    out.flush()
        .await
        .map_err(|e| Error::io("writing the download", e))?;
    if received != expected.length {
        return Err(Error::Download(format!(
            "received {received} bytes, the broker announced {}",
            expected.length
        )));
    }
    let actual = hex::encode(digest.finish().as_ref());
    if actual != expected.sha256 {
        return Err(Error::Download(format!(
            "SHA-256 {actual} differs from the announced {}",
            expected.sha256
        )));
    }
    Ok(())
}

/// `path` with `.partial` appended to its file name.
pub fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map_or_else(OsString::new, OsString::from);
    name.push(".partial");
    path.with_file_name(name)
}

/// Writes `body` to `path` through `path.partial`, renamed only once it is complete and
/// checked (and synced to disk); the partial file is removed on any failure, and when
/// `interrupt` is cancelled (the CLI cancels it on Ctrl-C).
///
/// # Errors
/// As [`copy_checked`]; [`Error::Io`] when the file cannot be created, synced or renamed;
/// [`Error::Interrupted`] when interrupted.
pub async fn to_file<S>(
    body: S,
    expected: &Expected,
    path: &Path,
    bar: &Bar,
    interrupt: &CancellationToken,
) -> Result<(), Error>
where
    S: Stream<Item = Result<Bytes, Error>>,
{
    let partial = partial_path(path);
    // Created before anything can stop the download, so that whatever stops it finds the
    // file to remove (a write still in flight then lands in the unlinked file).
    let file = std::fs::File::create(&partial)
        .map_err(|e| Error::io(format!("creating {}", partial.display()), e))?;
    let write = async {
        let mut file = tokio::fs::File::from_std(file);
        copy_checked(body, expected, &mut file, bar).await?;
        file.sync_all()
            .await
            .map_err(|e| Error::io(format!("syncing {}", partial.display()), e))
    };
    let written = tokio::select! {
        written = write => written,
        () = interrupt.cancelled() => Err(Error::Interrupted(format!(
            "{} was removed",
            partial.display()
        ))),
    };
    if let Err(error) = written {
        // Removing is best effort: the failure that matters is the one being returned.
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(error);
    }
    tokio::fs::rename(&partial, path).await.map_err(|e| {
        Error::io(
            format!("renaming {} to {}", partial.display(), path.display()),
            e,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 300 KiB of varied bytes, in chunks as a connection would deliver them.
    fn payload() -> Vec<u8> {
        (0..300 * 1024u32)
            .map(|i| (i * 7 + i / 251) as u8)
            .collect()
    }

    fn body(bytes: &[u8]) -> impl Stream<Item = Result<Bytes, Error>> + use<> {
        let chunks: Vec<Result<Bytes, Error>> = bytes
            .chunks(16 * 1024 + 3)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        futures::stream::iter(chunks)
    }

    fn expected_for(bytes: &[u8]) -> Expected {
        let mut digest = Context::new(&SHA256);
        digest.update(bytes);
        Expected {
            length: bytes.len() as u64,
            sha256: hex::encode(digest.finish().as_ref()),
        }
    }

    /// As with `--json`: no bar.
    fn hidden() -> Bar {
        Bar::new(true, None, "")
    }

    /// [`to_file`] without a bar, never interrupted.
    async fn write<S>(body: S, expected: &Expected, path: &Path) -> Result<(), Error>
    where
        S: Stream<Item = Result<Bytes, Error>>,
    {
        to_file(body, expected, path, &hidden(), &CancellationToken::new()).await
    }

    #[tokio::test]
    async fn a_complete_download_is_renamed_into_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("backup.bin");
        let data = payload();
        write(body(&data), &expected_for(&data), &path)
            .await
            .unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data);
        assert!(!partial_path(&path).exists());
    }

    #[tokio::test]
    async fn a_download_with_a_flipped_byte_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("backup.bin");
        let data = payload();
        let mut damaged = data.clone();
        damaged[200_000] ^= 0x01;
        let error = write(body(&damaged), &expected_for(&data), &path)
            .await
            .unwrap_err();
        assert!(
            matches!(error, Error::Download(ref m) if m.contains("SHA-256")),
            "{error}"
        );
        assert!(!path.exists());
        assert!(!partial_path(&path).exists());
    }

    #[tokio::test]
    async fn a_truncated_download_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("backup.bin");
        let data = payload();
        let error = write(body(&data[..data.len() - 1]), &expected_for(&data), &path)
            .await
            .unwrap_err();
        assert!(
            matches!(error, Error::Download(ref m) if m.contains("bytes")),
            "{error}"
        );
        assert!(!path.exists());
        assert!(!partial_path(&path).exists());
    }

    #[tokio::test]
    async fn a_broken_transfer_leaves_no_file_and_keeps_an_older_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("backup.bin");
        std::fs::write(&path, b"an earlier download").unwrap();
        let data = payload();
        let broken =
            body(&data[..50_000]).chain(futures::stream::iter([Err(Error::Unreachable {
                url: "http://broker".into(),
                reason: "connection reset".into(),
            })]));
        let error = write(broken, &expected_for(&data), &path)
            .await
            .unwrap_err();
        assert!(matches!(error, Error::Unreachable { .. }), "{error}");
        assert_eq!(std::fs::read(&path).unwrap(), b"an earlier download");
        assert!(!partial_path(&path).exists());
    }

    #[tokio::test]
    async fn an_interrupted_download_removes_the_partial_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("backup.bin");
        let data = payload();
        // The first chunks arrive, then the connection stalls.
        let stalled = body(&data[..50_000]).chain(futures::stream::pending());
        let expected = expected_for(&data);
        let interrupt = CancellationToken::new();
        let download = {
            let (path, interrupt) = (path.clone(), interrupt.clone());
            tokio::spawn(
                async move { to_file(stalled, &expected, &path, &hidden(), &interrupt).await },
            )
        };
        let partial = partial_path(&path);
        for _ in 0..2000 {
            if std::fs::metadata(&partial).is_ok_and(|m| m.len() == 50_000) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(std::fs::metadata(&partial).unwrap().len(), 50_000);
        interrupt.cancel();
        let error = download.await.unwrap().unwrap_err();
        assert!(matches!(error, Error::Interrupted(_)), "{error}");
        assert!(!path.exists());
        assert!(!partial.exists());
    }

    #[tokio::test]
    async fn a_longer_body_than_announced_fails_before_the_end() {
        let data = payload();
        let mut expected = expected_for(&data);
        expected.length -= 1;
        let mut out = Vec::new();
        let error = copy_checked(body(&data), &expected, &mut out, &hidden())
            .await
            .unwrap_err();
        assert!(
            matches!(error, Error::Download(ref m) if m.contains("more than")),
            "{error}"
        );
        assert!(out.len() < data.len());
    }
}
