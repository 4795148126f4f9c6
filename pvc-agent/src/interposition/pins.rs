//! The BPF file system: mounting it when the host has not, and the layout of
//! an instance's pins.

use std::{
    ffi::CString,
    fs,
    os::unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    path::Path,
};

use anyhow::{Context as _, bail};
use aya::programs::links::PinnedLink;
use tracing::info;

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

fn fs_type(path: &Path) -> std::io::Result<i64> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `st` a properly sized buffer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_type as i64)
}

/// Mounts bpffs at `path` unless it is mounted already (systemd does it on
/// most hosts; minimal systems and containers may not).
pub fn ensure_bpffs(path: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(path).with_context(|| format!("cannot create {}", path.display()))?;
    if fs_type(path)? == BPF_FS_MAGIC {
        return Ok(());
    }
    let target = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: all arguments are valid C strings; data is null.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        bail!(
            "{} is not a BPF file system and mounting one failed ({err}); \
             mount it with `mount -t bpf bpf {}`",
            path.display(),
            path.display()
        );
    }
    info!(path = %path.display(), "mounted the BPF file system");
    Ok(())
}

pub fn create_dir(path: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(path).with_context(|| format!("cannot create pin folder {}", path.display()))
}

/// Inode number of a cgroup folder: names the link pinned for it, so that a
/// changed configuration is noticed.
pub fn inode(path: &Path) -> anyhow::Result<u64> {
    Ok(fs::metadata(path)
        .with_context(|| format!("cgroup {} does not exist", path.display()))?
        .ino())
}

/// A cgroup v2 as the programs check it: its id (the inode number of its
/// folder) and its depth below the hierarchy's root. The root itself is id
/// 0: every process, nothing to check.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgroupScope {
    pub id: u64,
    pub level: u32,
}

impl CgroupScope {
    pub fn of(path: &Path) -> anyhow::Result<Self> {
        let path = path
            .canonicalize()
            .with_context(|| format!("cgroup {} does not exist", path.display()))?;
        let dev = fs::metadata(&path)?.dev();
        // Up to the hierarchy's root: the last ancestor that is a cgroup of
        // the same file system.
        let mut level = 0;
        let mut dir = path.as_path();
        while let Some(parent) = dir.parent() {
            let same_fs = fs::metadata(parent).is_ok_and(|m| m.dev() == dev);
            if !same_fs || !parent.join("cgroup.procs").exists() {
                break;
            }
            level += 1;
            dir = parent;
        }
        if level == 0 {
            return Ok(Self::default());
        }
        Ok(Self {
            id: inode(&path)?,
            level,
        })
    }
}

/// Detaches links pinned for another target (the configuration changed).
pub fn remove_stale(dir: &Path, prefix: &str, keep: &Path) -> anyhow::Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with(prefix) && path != keep {
            info!(pin = %path.display(), "detaching a link left for another interface or cgroup");
            unpin_link(&path)?;
        }
    }
    Ok(())
}

fn unpin_link(path: &Path) -> anyhow::Result<()> {
    match PinnedLink::from_pin(path) {
        // Dropping the last reference detaches the program.
        Ok(link) => drop(link.unpin()?),
        Err(_) => fs::remove_file(path)?,
    }
    Ok(())
}

/// Removes everything an instance pinned: links first (detaching the
/// programs), then maps and folders.
pub fn remove_instance(pin_dir: &Path) -> anyhow::Result<()> {
    let links = pin_dir.join("links");
    if links.exists() {
        for entry in fs::read_dir(&links)? {
            unpin_link(&entry?.path())?;
        }
        fs::remove_dir(&links)?;
    }
    if pin_dir.exists() {
        for entry in fs::read_dir(pin_dir)? {
            fs::remove_file(entry?.path())?;
        }
        fs::remove_dir(pin_dir)?;
    }
    // The shared parent goes when the last instance does.
    if let Some(parent) = pin_dir.parent() {
        let _ = fs::remove_dir(parent);
    }
    Ok(())
}
