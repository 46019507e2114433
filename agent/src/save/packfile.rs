//! Git's pack format (version 2) and its index (version 2): the entries both a push's
//! pack ([`super::pack`]) and a flush's ([`super::objects`]) are made of, and the pack
//! a flush stores in the repository with its index, both written here.
//!
//! A flush used to hand its objects to libgit2's packbuilder, which starts a new zlib
//! state for every object, and then to its indexer, which inflates and hashes every
//! object again to learn what the flush already knew: each object's id. [`PackFile`]
//! deflates each object once with one reused state (at zlib's fastest level, as a push
//! and git's loose objects do) and writes the index from the ids it was given.

use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use flate2::Compression;
use git2::{ObjectType, Oid};
use sha1::{Digest, Sha1};

/// What git gives a pack and its index: read-only.
const PACK_MODE: u32 = 0o444;

/// Append the zlib stream of `data` to `out`, with `z` (reset first).
pub(crate) fn deflate_into(
    z: &mut flate2::Compress,
    data: &[u8],
    out: &mut Vec<u8>,
) -> io::Result<()> {
    z.reset();
    loop {
        // Room for the stream of what is left (it hardly ever grows by more than a
        // tenth) and zlib's framing.
        let left = data.len() - z.total_in() as usize;
        out.reserve(left + left / 8 + 64);
        let done = z
            .compress_vec(
                &data[z.total_in() as usize..],
                out,
                flate2::FlushCompress::Finish,
            )
            .map_err(io::Error::other)?;
        if done == flate2::Status::StreamEnd {
            return Ok(());
        }
    }
}

/// A pack entry's header: the type and the size, seven bits at a time.
pub(crate) fn entry_header(w: &mut impl Write, kind: ObjectType, size: usize) -> io::Result<()> {
    let t: u8 = match kind {
        ObjectType::Commit => 1,
        ObjectType::Tree => 2,
        ObjectType::Blob => 3,
        ObjectType::Tag => 4,
        other => return Err(io::Error::other(format!("cannot pack a {other} object"))),
    };
    let mut size = size as u64;
    let mut head = Vec::with_capacity(10);
    let mut byte = (t << 4) | (size & 0x0f) as u8;
    size >>= 4;
    while size > 0 {
        head.push(byte | 0x80);
        byte = (size & 0x7f) as u8;
        size >>= 7;
    }
    head.push(byte);
    w.write_all(&head)
}

/// A pack being made in memory: its entries and, for the index, each one's id, offset
/// and CRC-32.
pub(crate) struct PackFile {
    data: Vec<u8>,
    count: u32,
    entries: Vec<(Oid, u32, u64)>,
    z: flate2::Compress,
}

impl PackFile {
    /// A pack of `count` objects (its header says so; [`PackFile::finish`] checks).
    pub(crate) fn new(count: u32) -> PackFile {
        let mut data = Vec::with_capacity(64 * 1024);
        data.extend_from_slice(b"PACK");
        data.extend_from_slice(&2u32.to_be_bytes());
        data.extend_from_slice(&count.to_be_bytes());
        PackFile {
            data,
            count,
            entries: Vec::with_capacity(count as usize),
            z: flate2::Compress::new(Compression::fast(), true),
        }
    }

    /// Add object `id` of `kind` whose content is `data`.
    pub(crate) fn add(&mut self, id: Oid, kind: ObjectType, data: &[u8]) -> io::Result<()> {
        let offset = self.data.len() as u64;
        entry_header(&mut self.data, kind, data.len())?;
        deflate_into(&mut self.z, data, &mut self.data)?;
        let crc = crc32fast::hash(&self.data[offset as usize..]);
        self.entries.push((id, crc, offset));
        Ok(())
    }

    /// Store the pack and its index in `pack_dir` (`objects/pack`): each written to a
    /// temporary file there, then renamed, the index last (a pack without one is not
    /// read). `fsync`: flush each to disk before its rename (`core.fsyncObjectFiles`).
    /// Returns the pack's checksum, which names it.
    pub(crate) fn finish(mut self, pack_dir: &Path, fsync: bool) -> io::Result<Oid> {
        if self.entries.len() != self.count as usize {
            return Err(io::Error::other(format!(
                "{} objects added to a pack of {}",
                self.entries.len(),
                self.count
            )));
        }
        let sum = Sha1::digest(&self.data);
        self.data.extend_from_slice(&sum);
        let name = Oid::from_bytes(&sum).map_err(io::Error::other)?;
        let idx = index(&mut self.entries, &sum);
        let base = pack_dir.join(format!("pack-{name}"));
        store(pack_dir, &self.data, &base.with_extension("pack"), fsync)?;
        store(pack_dir, &idx, &base.with_extension("idx"), fsync)?;
        Ok(name)
    }
}

/// The version 2 index of a pack whose checksum is `sum` and whose entries are
/// `entries` (sorted here by id).
fn index(entries: &mut [(Oid, u32, u64)], sum: &[u8]) -> Vec<u8> {
    entries.sort_unstable_by_key(|e| e.0);
    let mut out = Vec::with_capacity(8 + 1024 + entries.len() * 28 + 40);
    out.extend_from_slice(b"\xfftOc");
    out.extend_from_slice(&2u32.to_be_bytes());
    let mut fanout = [0u32; 256];
    for (id, _, _) in entries.iter() {
        fanout[id.as_bytes()[0] as usize] += 1;
    }
    let mut total = 0u32;
    for n in fanout {
        total += n;
        out.extend_from_slice(&total.to_be_bytes());
    }
    for (id, _, _) in entries.iter() {
        out.extend_from_slice(id.as_bytes());
    }
    for (_, crc, _) in entries.iter() {
        out.extend_from_slice(&crc.to_be_bytes());
    }
    // Offsets past 2^31 go to a table of 64-bit ones, pointed at with the top bit.
    let mut large: Vec<u64> = Vec::new();
    for (_, _, offset) in entries.iter() {
        let small = if *offset < 0x8000_0000 {
            *offset as u32
        } else {
            large.push(*offset);
            0x8000_0000 | (large.len() as u32 - 1)
        };
        out.extend_from_slice(&small.to_be_bytes());
    }
    for offset in large {
        out.extend_from_slice(&offset.to_be_bytes());
    }
    out.extend_from_slice(sum);
    let own = Sha1::digest(&out);
    out.extend_from_slice(&own);
    out
}

/// Write `bytes` to `to` through a temporary file in `dir`, read-only once there.
fn store(dir: &Path, bytes: &[u8], to: &Path, fsync: bool) -> io::Result<()> {
    let mut tmp = tempfile::Builder::new()
        .prefix("tmp_pack_")
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    if fsync {
        tmp.as_file().sync_all()?;
    }
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(PACK_MODE))?;
    tmp.persist(to).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::read::ZlibDecoder;
    use std::io::Read;

    fn git(dir: &Path, args: &[&str]) -> std::process::Output {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// The pack and index written here are what git reads and verifies, and the index
    /// is byte for byte the one `git index-pack` makes of the same pack.
    #[test]
    fn a_pack_and_its_index_are_what_git_verifies_and_would_write() {
        let dir = tempfile::tempdir().unwrap();
        let repo = git2::Repository::init(dir.path()).unwrap();
        let big = crate::save::objects::tests::random_bytes(100_000, 7);
        let blobs = [&b"one\n"[..], &b""[..], &big[..]];
        let mut objects: Vec<(Oid, ObjectType, Vec<u8>)> = blobs
            .iter()
            .map(|b| {
                (
                    Oid::hash_object(ObjectType::Blob, b).unwrap(),
                    ObjectType::Blob,
                    b.to_vec(),
                )
            })
            .collect();
        // A tree and a commit made by libgit2 in a scratch repository, copied here.
        let scratch = tempfile::tempdir().unwrap();
        let other = git2::Repository::init(scratch.path()).unwrap();
        let mut tb = other.treebuilder(None).unwrap();
        for (i, (id, _, data)) in objects.iter().enumerate() {
            assert_eq!(other.blob(data).unwrap(), *id);
            tb.insert(format!("f{i}"), *id, 0o100644).unwrap();
        }
        let tree = tb.write().unwrap();
        let sig = git2::Signature::now("t", "t@example.com").unwrap();
        let commit = other
            .commit(None, &sig, &sig, "m", &other.find_tree(tree).unwrap(), &[])
            .unwrap();
        let odb = other.odb().unwrap();
        for id in [tree, commit] {
            let o = odb.read(id).unwrap();
            objects.push((id, o.kind(), o.data().to_vec()));
        }

        let pack_dir = dir.path().join(".git/objects/pack");
        let mut pack = PackFile::new(objects.len() as u32);
        for (id, kind, data) in &objects {
            pack.add(*id, *kind, data).unwrap();
        }
        let name = pack.finish(&pack_dir, true).unwrap();
        let idx = pack_dir.join(format!("pack-{name}.idx"));
        let packfile = pack_dir.join(format!("pack-{name}.pack"));
        let mode = std::fs::metadata(&packfile).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o444);
        let v = git(dir.path(), &["verify-pack", "-v", idx.to_str().unwrap()]);
        let text = String::from_utf8_lossy(&v.stdout);
        assert!(text.contains("non delta: 5 objects"), "{text}");
        // git's own index of the same pack.
        let theirs = dir.path().join("theirs.idx");
        git(
            dir.path(),
            &[
                "index-pack",
                "-o",
                theirs.to_str().unwrap(),
                packfile.to_str().unwrap(),
            ],
        );
        assert!(std::fs::read(&theirs).unwrap() == std::fs::read(&idx).unwrap());
        git(dir.path(), &["fsck", "--strict", &commit.to_string()]);
        let out = git(dir.path(), &["cat-file", "blob", &format!("{commit}:f2")]);
        assert!(out.stdout == big);
        drop(repo);

        let wrong = PackFile::new(2);
        let err = wrong.finish(&pack_dir, false).unwrap_err();
        assert_eq!(err.to_string(), "0 objects added to a pack of 2");
    }

    /// Offsets past 2 GiB are in the table of 64-bit offsets, as git reads them.
    #[test]
    fn offsets_past_two_gib_go_to_the_large_offset_table() {
        let id = |b: u8| Oid::from_bytes(&[b; 20]).unwrap();
        let mut entries = vec![
            (id(2), 0xaa, 5u64 << 30),
            (id(1), 0xbb, 12),
            (id(3), 0xcc, 3u64 << 31),
        ];
        let idx = index(&mut entries, &[9; 20]);
        let n = 3;
        let fanout_at = 8;
        let be32 = |at: usize| u32::from_be_bytes(idx[at..at + 4].try_into().unwrap());
        assert_eq!(be32(fanout_at), 0);
        assert_eq!(be32(fanout_at + 4), 1, "ids up to 0x01");
        assert_eq!(be32(fanout_at + 255 * 4), n);
        let ids_at = fanout_at + 1024;
        assert_eq!(&idx[ids_at..ids_at + 20], &[1; 20], "sorted");
        let crcs_at = ids_at + 20 * 3;
        assert_eq!(be32(crcs_at), 0xbb);
        let offs_at = crcs_at + 4 * 3;
        assert_eq!(be32(offs_at), 12);
        assert_eq!(be32(offs_at + 4), 0x8000_0000);
        assert_eq!(be32(offs_at + 8), 0x8000_0001);
        let large_at = offs_at + 12;
        let be64 = |at: usize| u64::from_be_bytes(idx[at..at + 8].try_into().unwrap());
        assert_eq!(be64(large_at), 5u64 << 30);
        assert_eq!(be64(large_at + 8), 3u64 << 31);
        assert_eq!(
            &idx[large_at + 16..large_at + 36],
            &[9; 20],
            "the pack's checksum"
        );
        assert_eq!(idx.len(), large_at + 56);
        assert_eq!(
            &idx[large_at + 36..],
            &Sha1::digest(&idx[..large_at + 36])[..]
        );
    }

    /// One deflate state serves object after object, whatever their size and however
    /// little they shrink: each stream inflates back to its bytes.
    #[test]
    fn one_deflate_state_makes_every_small_objects_stream() {
        let random = crate::save::objects::tests::random_bytes(200_000, 0x9E37_79B9_7F4A_7C15);
        let text = b"a line of text\n".repeat(5000);
        let mut z = flate2::Compress::new(Compression::fast(), true);
        for data in [&random[..], &b""[..], &text[..], &random[..7], &text[..]] {
            let mut out = b"head".to_vec();
            deflate_into(&mut z, data, &mut out).unwrap();
            assert_eq!(&out[..4], b"head");
            let mut back = Vec::new();
            ZlibDecoder::new(&out[4..]).read_to_end(&mut back).unwrap();
            assert_eq!(back, data);
        }
    }

    #[test]
    fn entry_headers_are_git_varints() {
        let mut v = Vec::new();
        entry_header(&mut v, ObjectType::Blob, 15).unwrap();
        assert_eq!(v, [0x3f]);
        v.clear();
        entry_header(&mut v, ObjectType::Commit, 16).unwrap();
        assert_eq!(v, [0x90, 0x01]);
        v.clear();
        entry_header(&mut v, ObjectType::Tree, 500 << 20).unwrap();
        // 500 MiB = 0x1F400000: the low nibble 0, then 0x1F40000 seven bits at a time.
        assert_eq!(v, [0xa0, 0x80, 0x80, 0xd0, 0x0f]);
    }
}
