//! The pack a push sends, written here instead of by libgit2's packbuilder.
//!
//! libgit2 builds a push's pack in memory object by object: each object is read whole
//! (a loose one twice over: its compressed file, then the inflated object), considered
//! for deltas, and deflated. A new 500 MiB file made a save peak at a gigabyte (issue
//! 16), and several at once (`save.parallelism`) could make PID 1 the process the OOM
//! killer picks. [`write`] streams instead: the objects a push must send are found from
//! the commits alone, by comparing each new commit's tree with its parents' (entries
//! the same at the same path are never opened, so the cost follows the change, not the
//! repository), and made one after the other as a version 2 pack with no deltas while
//! the HTTP client reads it into the request ([`PackReader`]); a large blob is read
//! from its loose object through an inflating reader and deflated again a buffer at a
//! time (at zlib's fastest level, or stored when a sample does not shrink:
//! `objects::level_for`). The push's memory stays a few buffers, whatever the size of the files, and
//! the server unpacks while the pack is still being made.
//!
//! The HTTP transport ([`crate::githttp`]) sends this pack in place of libgit2's, which
//! is empty because the push shows libgit2 the new tips as objects the server has
//! (`save::bases`). Only git's smart HTTP goes through that transport; a push to a
//! local path or over SSH keeps libgit2's own pack.
//!
//! No deltas: a save's new objects are the changed files and the trees above them, and
//! libgit2's push made no deltas against what the remote has either (no thin packs).
//! A large blob the repository holds only in a pack (not loose) is read whole: a
//! save writes every new large file loose, so only an old commit's file that `git gc`
//! packed before it was ever pushed takes that path.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::path::PathBuf;

use flate2::Compression;
use flate2::read::ZlibDecoder;
use flate2::write::ZlibEncoder;
use git2::{ObjectType, Oid, Repository, Tree};
use sha1::{Digest, Sha1};

use super::objects::{level_for, read_full};
use super::packfile::{deflate_into, entry_header};

/// Blobs this large are streamed (and deflated at zlib's fastest level, as git stores
/// loose objects): the same bound as the save's own streaming of large files.
const STREAM_AT: usize = super::objects::LARGE_BLOB as usize;
/// The buffer a large blob moves through.
const CHUNK: usize = 256 * 1024;

/// What a written pack holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Written {
    pub objects: u32,
    pub bytes: u64,
}

/// The objects the remote lacks for `tips`, given the commits it has (`have`): every
/// commit reachable from a tip and not from `have`, and of each one's tree what is not
/// the same at the same path in one of its parents' trees. A parent missing locally (a
/// shallow clone) counts as having nothing.
pub(crate) fn objects(
    repo: &Repository,
    tips: &[Oid],
    have: &[Oid],
) -> Result<Vec<(Oid, ObjectType)>, git2::Error> {
    let mut walk = repo.revwalk()?;
    for t in tips {
        walk.push(*t)?;
    }
    for h in have {
        // Not a commit, or not here: nothing to hide.
        let _ = walk.hide(*h);
    }
    let mut out = Vec::new();
    let mut seen: HashSet<Oid> = HashSet::new();
    for id in walk {
        let commit = repo.find_commit(id?)?;
        if !seen.insert(commit.id()) {
            continue;
        }
        out.push((commit.id(), ObjectType::Commit));
        let bases: Vec<Tree<'_>> = commit.parents().filter_map(|p| p.tree().ok()).collect();
        let tree = commit.tree()?;
        if bases.iter().any(|b| b.id() == tree.id()) {
            continue;
        }
        add_tree(repo, &tree, &bases, &mut seen, &mut out)?;
    }
    Ok(out)
}

/// `tree` and what under it is not the same in `bases` (the same directory in the
/// parents), depth first.
fn add_tree(
    repo: &Repository,
    tree: &Tree<'_>,
    bases: &[Tree<'_>],
    seen: &mut HashSet<Oid>,
    out: &mut Vec<(Oid, ObjectType)>,
) -> Result<(), git2::Error> {
    if !seen.insert(tree.id()) {
        return Ok(());
    }
    out.push((tree.id(), ObjectType::Tree));
    for entry in tree.iter() {
        let id = entry.id();
        let kind = match entry.kind() {
            Some(k @ (ObjectType::Blob | ObjectType::Tree)) => k,
            // A submodule's commit lives in another repository.
            _ => continue,
        };
        if seen.contains(&id) {
            continue;
        }
        let name = entry.name_bytes();
        let same: Vec<Option<Oid>> = bases
            .iter()
            .map(|b| b.get_name_bytes(name).map(|e| e.id()))
            .collect();
        if same.contains(&Some(id)) {
            continue;
        }
        if kind == ObjectType::Blob {
            seen.insert(id);
            out.push((id, kind));
            continue;
        }
        let sub: Vec<Tree<'_>> = bases
            .iter()
            .filter_map(|b| b.get_name_bytes(name))
            .filter(|e| e.kind() == Some(ObjectType::Tree))
            .filter_map(|e| repo.find_tree(e.id()).ok())
            .collect();
        add_tree(repo, &repo.find_tree(id)?, &sub, seen, out)?;
    }
    Ok(())
}

/// A version 2 pack of `objects`, produced as it is read: the HTTP transport reads it
/// straight into the request body, so the pack is made while the server receives it
/// and never held in memory or on disk whole. Reads run on the caller's thread (as the
/// repository's owner, see `fsids`).
pub(crate) struct PackReader {
    repo: Repository,
    loose_dir: PathBuf,
    objects: std::vec::IntoIter<(Oid, ObjectType)>,
    /// Bytes made and not yet read, from `at`.
    out: Vec<u8>,
    at: usize,
    /// The SHA-1 of everything so far; `None` once the trailer is out.
    hash: Option<Sha1>,
    large: Option<Large>,
    buf: Vec<u8>,
    /// One deflate state for every small object, reset between them: made anew for each,
    /// its allocation is an mmap and a munmap per object (glibc's fixed mmap threshold).
    /// zlib's fastest level, as git stores loose objects: a save's pack is a few changed
    /// files, sent once, and the remote stores it as it likes.
    small: flate2::Compress,
    written: Written,
}

/// A large blob being moved: inflated from its loose object, deflated into the pack.
struct Large {
    id: Oid,
    src: ZlibDecoder<BufReader<File>>,
    z: ZlibEncoder<Vec<u8>>,
    left: u64,
    size: usize,
}

impl PackReader {
    pub(crate) fn new(
        repo: Repository,
        objects: Vec<(Oid, ObjectType)>,
    ) -> Result<PackReader, PackError> {
        let count = u32::try_from(objects.len())
            .map_err(|_| PackError::Other("more than 2^32 objects to push".into()))?;
        let loose_dir = repo.commondir().join("objects");
        let mut r = PackReader {
            repo,
            loose_dir,
            objects: objects.into_iter(),
            out: Vec::with_capacity(CHUNK),
            at: 0,
            hash: Some(Sha1::new()),
            large: None,
            buf: Vec::new(),
            small: flate2::Compress::new(Compression::fast(), true),
            written: Written {
                objects: count,
                bytes: 0,
            },
        };
        r.emit(b"PACK");
        r.emit(&2u32.to_be_bytes());
        r.emit(&count.to_be_bytes());
        Ok(r)
    }

    /// What the pack holds and how much of it has been made so far.
    #[cfg(test)]
    pub(crate) fn written(&self) -> Written {
        self.written
    }

    fn emit(&mut self, data: &[u8]) {
        if let Some(h) = self.hash.as_mut() {
            h.update(data);
        }
        self.written.bytes += data.len() as u64;
        self.out.extend_from_slice(data);
    }

    /// Make the next bytes of the pack; false once it is all out.
    fn make(&mut self) -> Result<bool, PackError> {
        if let Some(mut l) = self.large.take() {
            if self.buf.len() != CHUNK {
                self.buf = vec![0; CHUNK];
            }
            let want = CHUNK.min(l.left as usize);
            let n = if want == 0 {
                0
            } else {
                l.src.read(&mut self.buf[..want])?
            };
            if n > 0 {
                l.z.write_all(&self.buf[..n])?;
                l.left -= n as u64;
                let made = std::mem::take(l.z.get_mut());
                self.emit(&made);
                self.large = Some(l);
                return Ok(true);
            }
            if l.left != 0 || l.src.read(&mut [0u8; 1])? != 0 {
                return Err(PackError::Object(
                    l.id,
                    format!(
                        "holds a different number of bytes than its header's {}",
                        l.size
                    ),
                ));
            }
            let rest = l.z.finish()?;
            self.emit(&rest);
            return Ok(true);
        }
        if let Some((id, _)) = self.objects.next() {
            self.object(id)?;
            return Ok(true);
        }
        if let Some(h) = self.hash.take() {
            let digest = h.finalize();
            self.written.bytes += digest.len() as u64;
            self.out.extend_from_slice(&digest);
            return Ok(true);
        }
        Ok(false)
    }

    /// One object: whole when small, or the start of a large blob's stream.
    fn object(&mut self, id: Oid) -> Result<(), PackError> {
        let (entry, large) = self.entry(id)?;
        self.emit(&entry);
        self.large = large;
        Ok(())
    }

    /// An object's pack entry, or the header of one and the stream of the rest.
    fn entry(&mut self, id: Oid) -> Result<(Vec<u8>, Option<Large>), PackError> {
        let odb = self.repo.odb()?;
        let (size, kind) = odb.read_header(id)?;
        let mut entry = Vec::new();
        if kind == ObjectType::Blob
            && size >= STREAM_AT
            && let Some(src) = loose_blob(&self.loose_dir, id, size)?
        {
            entry_header(&mut entry, kind, size)?;
            let mut src = src;
            let mut sample = vec![0u8; CHUNK.min(size)];
            let n = read_full(&mut src, &mut sample)?;
            let mut z = ZlibEncoder::new(Vec::with_capacity(CHUNK), level_for(&sample[..n]));
            z.write_all(&sample[..n])?;
            let large = Large {
                id,
                src,
                z,
                left: (size - n) as u64,
                size,
            };
            return Ok((entry, Some(large)));
        }
        // Small, or a large blob that is not loose: read whole.
        let obj = odb.read(id)?;
        entry_header(&mut entry, obj.kind(), obj.len())?;
        if obj.len() >= STREAM_AT {
            let level = level_for(&obj.data()[..CHUNK.min(obj.len())]);
            let mut z = ZlibEncoder::new(entry, level);
            z.write_all(obj.data())?;
            return Ok((z.finish()?, None));
        }
        deflate_into(&mut self.small, obj.data(), &mut entry)?;
        Ok((entry, None))
    }
}

impl Read for PackReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.out.len() {
            self.out.clear();
            self.at = 0;
            if !self.make().map_err(io::Error::other)? {
                return Ok(0);
            }
        }
        let n = buf.len().min(self.out.len() - self.at);
        buf[..n].copy_from_slice(&self.out[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// The loose object of blob `id` (`size` bytes), positioned after its `blob <size>\0`
/// header; `None` when it is not loose.
fn loose_blob(
    loose_dir: &std::path::Path,
    id: Oid,
    size: usize,
) -> Result<Option<ZlibDecoder<BufReader<File>>>, PackError> {
    let hex = id.to_string();
    let path: PathBuf = loose_dir.join(&hex[..2]).join(&hex[2..]);
    let Ok(file) = File::open(&path) else {
        return Ok(None);
    };
    let mut src = ZlibDecoder::new(BufReader::with_capacity(CHUNK, file));
    let mut head = Vec::with_capacity(32);
    let mut b = [0u8; 1];
    loop {
        src.read_exact(&mut b)
            .map_err(|e| PackError::Object(id, format!("reading its header: {e}")))?;
        if b[0] == 0 {
            break;
        }
        head.push(b[0]);
        if head.len() > 32 {
            return Err(PackError::Object(id, "its header is not git's".into()));
        }
    }
    if head != format!("blob {size}").as_bytes() {
        return Err(PackError::Object(
            id,
            format!("its header says {:?}", String::from_utf8_lossy(&head)),
        ));
    }
    Ok(Some(src))
}

/// Why a pack could not be written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PackError {
    #[error("{}", .0.message())]
    Git(#[from] git2::Error),
    #[error("writing the pack: {0}")]
    Io(#[from] io::Error),
    #[error("object {0}: {1}")]
    Object(Oid, String),
    #[error("{0}")]
    Other(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::process::{Command, Stdio};

    fn git(dir: &Path, args: &[&str]) -> String {
        let out = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.com")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.com")
            .output()
            .expect("git runs");
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// A repository whose remote has its first commit; then two local commits on top
    /// (a change deep in a directory, a new large file) and a merge of a side branch.
    /// The pack of what the remote lacks, fed to git's `index-pack` in the remote,
    /// makes the remote hold the whole new history, and nothing it had is in the pack.
    #[test]
    fn the_pack_holds_exactly_what_the_remote_lacks_and_git_reads_it() {
        let tmp = tempfile::tempdir().unwrap();
        let work = tmp.path().join("work");
        let remote = tmp.path().join("remote.git");
        std::fs::create_dir_all(work.join("a/b")).unwrap();
        git(
            tmp.path(),
            &["init", "-q", "-b", "main", work.to_str().unwrap()],
        );
        git(
            tmp.path(),
            &["init", "-q", "--bare", remote.to_str().unwrap()],
        );
        for i in 0..20 {
            std::fs::write(work.join(format!("a/b/f{i}.txt")), format!("file {i}\n")).unwrap();
            std::fs::write(work.join(format!("top{i}.txt")), format!("top {i}\n")).unwrap();
        }
        git(&work, &["add", "-A"]);
        git(&work, &["commit", "-qm", "base"]);
        let base = git(&work, &["rev-parse", "HEAD"]);
        git(&work, &["push", "-q", remote.to_str().unwrap(), "main"]);

        git(&work, &["checkout", "-qb", "side"]);
        std::fs::write(work.join("side.txt"), "side\n").unwrap();
        git(&work, &["add", "-A"]);
        git(&work, &["commit", "-qm", "side"]);
        git(&work, &["checkout", "-q", "main"]);
        std::fs::write(work.join("a/b/f3.txt"), "changed\n").unwrap();
        git(&work, &["commit", "-qam", "change"]);
        // Random-looking bytes past the streaming bound, written loose by git.
        let big: Vec<u8> = (0..(STREAM_AT + 12345) as u64)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        std::fs::write(work.join("a/big.bin"), &big).unwrap();
        git(&work, &["add", "-A"]);
        git(&work, &["commit", "-qm", "big"]);
        git(&work, &["merge", "-q", "--no-edit", "side"]);
        let tip = git(&work, &["rev-parse", "HEAD"]);

        let repo = Repository::open(&work).unwrap();
        let tip_id = Oid::from_str(&tip).unwrap();
        let list = objects(&repo, &[tip_id], &[Oid::from_str(&base).unwrap()]).unwrap();
        let ids: HashSet<String> = list.iter().map(|(id, _)| id.to_string()).collect();
        // 4 commits; trees: root ×4 (change, big, side, merge), a ×2, a/b ×1; blobs:
        // f3, big, side.
        assert_eq!(list.len(), 4 + 7 + 3, "{list:?}");
        let had = git(&work, &["rev-parse", &format!("{base}:a/b/f4.txt")]);
        assert!(!ids.contains(&had), "an unchanged file is not sent");

        let mut file = tempfile::tempfile().unwrap();
        let mut pack = PackReader::new(Repository::open(&work).unwrap(), list.clone()).unwrap();
        // Read in odd-sized pieces, as the HTTP client does.
        let mut piece = vec![0u8; 8191];
        loop {
            let n = pack.read(&mut piece).unwrap();
            if n == 0 {
                break;
            }
            file.write_all(&piece[..n]).unwrap();
        }
        let written = pack.written();
        assert_eq!(written.objects as usize, list.len());
        assert_eq!(file.metadata().unwrap().len(), written.bytes);
        std::io::Seek::rewind(&mut file).unwrap();
        let mut child = Command::new("git")
            .arg("-C")
            .arg(&remote)
            .args(["index-pack", "--stdin", "--strict"])
            .stdin(Stdio::from(file))
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(child.success());
        child = Command::new("git")
            .arg("-C")
            .arg(&remote)
            .args(["update-ref", "refs/heads/main", &tip])
            .status()
            .unwrap();
        assert!(child.success());
        git(&remote, &["fsck", "--strict", "--no-dangling"]);
        assert_eq!(
            git(&remote, &["rev-parse", "main:a/big.bin"]),
            git(&work, &["rev-parse", "HEAD:a/big.bin"])
        );
        assert_eq!(
            git(&remote, &["cat-file", "-s", "main:a/big.bin"]),
            big.len().to_string()
        );
    }
}
