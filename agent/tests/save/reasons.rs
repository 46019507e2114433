//! A failed save says why in the user's words: the remote's own rejection text, and a
//! full disk as "no space left on device" with the path.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_remote_hook_text_is_in_the_outcome_error() {
    let fx = Fixture::new();
    let dir = fx.repo("app");
    std::fs::write(dir.join("mine.txt"), "mine\n").unwrap();
    let hook = fx.server.path("app.git").join("hooks/pre-receive");
    std::fs::write(
        &hook,
        "#!/bin/sh\necho 'policy says no' >&2\necho 'ask the admins' \nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();

    let outcomes = fx.save(&fx.config(), Duration::from_secs(30)).await;

    let o = one(&outcomes, &dir);
    assert_eq!(o.result, "committed", "{o:#?}");
    let e = o.error.as_deref().unwrap_or_default();
    assert!(e.contains("remote: policy says no"), "{o:#?}");
    assert!(e.contains("remote: ask the admins"), "{o:#?}");
    assert!(e.contains("pre-receive hook declined"), "{o:#?}");
    let journal = agent::save::last_outcomes(&fx.state);
    assert!(
        journal[0]
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("policy says no"),
        "{journal:#?}"
    );
}

/// Give this test process a mount namespace of its own (before any thread exists, so
/// that every thread is in it).
fn private_mounts() -> Result<(), String> {
    let root = CString::new("/").unwrap();
    // SAFETY: plain system calls on valid NUL-terminated strings.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(format!("unshare: {}", std::io::Error::last_os_error()));
        }
        if libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(format!("private /: {}", std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Mount a tmpfs of `size` on `dir`.
fn tmpfs(dir: &Path, size: &str) -> Result<(), String> {
    std::fs::create_dir_all(dir).unwrap();
    let c = |s: &[u8]| CString::new(s).unwrap();
    let (target, fstype, opts) = (
        c(dir.as_os_str().as_bytes()),
        c(b"tmpfs"),
        c(format!("size={size}").as_bytes()),
    );
    // SAFETY: a plain system call on valid NUL-terminated strings.
    let r = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            opts.as_ptr().cast(),
        )
    };
    if r != 0 {
        return Err(format!("mount tmpfs: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

#[test]
fn a_full_disk_is_reported_as_no_space_left_with_the_path() {
    if let Err(why) = private_mounts() {
        eprintln!("SKIPPED: no private mount namespace here ({why})");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let fx = Fixture::new();
    if let Err(why) = tmpfs(&fx.home.join("projects/app"), "1m") {
        eprintln!("SKIPPED: a tmpfs cannot be mounted here ({why})");
        return;
    }
    let dir = fx.repo("app");
    // Content that does not compress, then the disk filled up (outside the worktree).
    let noise: Vec<u8> = (0..96 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(dir.join("data.bin"), &noise).unwrap();
    let fill = dir.join(".git/fill");
    let mut f = std::fs::File::create(&fill).unwrap();
    let chunk = vec![0u8; 4096];
    while std::io::Write::write_all(&mut f, &chunk).is_ok() {}
    drop(f);

    let outcomes = rt.block_on(fx.save(&fx.config(), Duration::from_secs(30)));

    let o = one(&outcomes, &dir);
    assert_eq!(o.result, "failed", "{o:#?}");
    let e = o.error.as_deref().unwrap_or_default();
    assert!(e.contains("no space left on device"), "{o:#?}");
    assert!(!e.contains("Write error"), "{o:#?}");
    assert!(
        e.contains(&dir.join(".git/objects").display().to_string()),
        "{o:#?}"
    );
    let mount = CString::new(dir.as_os_str().as_bytes()).unwrap();
    // SAFETY: a plain system call on a valid NUL-terminated string.
    unsafe { libc::umount2(mount.as_ptr(), libc::MNT_DETACH) };
}
