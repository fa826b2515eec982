//! The shard layout of a storage directory, checked before any shard opens it.
//!
//! A conversation id names its owner shard, and a visitor's conversation is found on shard
//! `owner_of(site, visitor) % shards`. Data written by N shards is therefore only reachable
//! by a process running exactly N shards: with fewer, the conversations of the missing
//! shards are orphaned; with more, returning visitors are looked up on the wrong shard and
//! get a new conversation. So a process refuses to start on a directory whose shard stores
//! do not match its shard count, and says what to do.
//!
//! Invariant: a directory with no `shard-<n>/data.mdb` at all is fresh and fits any count.

use std::path::{Path, PathBuf};

/// The layout of `dir` does not match the configured number of shards.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error(
        "{dir} holds conversations stored by shard{plural} {found} but this configuration runs \
         {configured} shard{configured_plural} (0..={last}). Conversation ids name their owner shard, \
         so the data is only reachable with the same number of shards: set [shards] cores to \
         {expected} core{expected_plural}, or start on an empty [storage] dir",
        dir = dir.display(),
        plural = if found.len() == 1 { "" } else { "s" },
        found = list(found),
        configured_plural = if *configured == 1 { "" } else { "s" },
        last = configured.saturating_sub(1),
        expected = found.iter().max().map_or(0, |max| max + 1),
        expected_plural = if found.iter().max() == Some(&0) { "" } else { "s" },
    )]
    ShardCountChanged {
        dir: PathBuf,
        found: Vec<usize>,
        configured: usize,
    },
    #[error("cannot read storage directory {dir}: {source}", dir = dir.display())]
    Read {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn list(shards: &[usize]) -> String {
    shards
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The shards that have a store (`shard-<n>/data.mdb`) under `dir`, ascending.
pub fn stored_shards(dir: &Path) -> Result<Vec<usize>, LayoutError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(LayoutError::Read {
                dir: dir.to_owned(),
                source,
            })
        }
    };
    let mut shards = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| LayoutError::Read {
            dir: dir.to_owned(),
            source,
        })?;
        let name = entry.file_name();
        let Some(index) = name
            .to_str()
            .and_then(|name| name.strip_prefix("shard-"))
            .and_then(|index| index.parse::<usize>().ok())
        else {
            continue;
        };
        if entry.path().join("data.mdb").is_file() {
            shards.push(index);
        }
    }
    shards.sort_unstable();
    Ok(shards)
}

/// Checks that the stores under `dir` were written by exactly `shard_count` shards (or
/// that there are none yet).
pub fn check_shard_layout(dir: &Path, shard_count: usize) -> Result<(), LayoutError> {
    let found = stored_shards(dir)?;
    if found.is_empty() || found.iter().copied().eq(0..shard_count) {
        return Ok(());
    }
    Err(LayoutError::ShardCountChanged {
        dir: dir.to_owned(),
        found,
        configured: shard_count,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn make(dir: &Path, shards: &[usize]) {
        for shard in shards {
            let path = dir.join(format!("shard-{shard}"));
            std::fs::create_dir_all(&path).unwrap();
            std::fs::write(path.join("data.mdb"), b"").unwrap();
        }
    }

    #[test]
    fn a_fresh_or_missing_directory_fits_any_count() {
        let dir = tempfile::tempdir().unwrap();
        check_shard_layout(&dir.path().join("absent"), 4).unwrap();
        std::fs::create_dir_all(dir.path().join("shard-0")).unwrap(); // no data.mdb yet
        std::fs::create_dir_all(dir.path().join("kb-0")).unwrap();
        check_shard_layout(dir.path(), 2).unwrap();
    }

    #[test]
    fn the_same_count_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        make(dir.path(), &[0, 1]);
        check_shard_layout(dir.path(), 2).unwrap();
    }

    #[test]
    fn fewer_or_more_shards_are_refused_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        make(dir.path(), &[0, 1]);
        let fewer = check_shard_layout(dir.path(), 1).unwrap_err().to_string();
        assert!(fewer.contains("shards 0, 1"), "{fewer}");
        assert!(fewer.contains("runs 1 shard (0..=0)"), "{fewer}");
        assert!(fewer.contains("set [shards] cores to 2 cores"), "{fewer}");
        let more = check_shard_layout(dir.path(), 4).unwrap_err().to_string();
        assert!(more.contains("runs 4 shards"), "{more}");
        // A gap (shard-1 lost) is refused too: shard 1's conversations would be missing.
        let gap = tempfile::tempdir().unwrap();
        make(gap.path(), &[0, 2]);
        assert!(check_shard_layout(gap.path(), 3).is_err());
    }
}
