//! The daemon's socket, put where other users may connect but never meddle. The daemon runs as
//! root: it must not follow a path a user can change, or a symlink swapped in between two of
//! its calls makes it chmod or chown any file.
//!
//! The socket's directory is opened once and checked: it belongs to root (or the daemon's
//! user), and no one else may write to it unless it is sticky (/tmp), where others cannot
//! rename or remove our entries. The socket is bound inside a private directory made there
//! (mode 700: nobody connects before its mode is set), given its group and mode there, and then
//! put in place: over a stale socket of ours, never over anything else. It is removed at exit
//! only if it is still ours.

use std::ffi::{CString, OsStr};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use crate::error::Error;

pub struct Listening {
    pub listener: UnixListener,
    pub path: PathBuf,
    dir: OwnedFd,
    name: CString,
    /// The socket's inode, to know it again at exit.
    node: (u64, u64),
}

impl Listening {
    /// Removes the socket, if what is at its path is still the one we made.
    pub fn remove(self) {
        if stat_at(self.dir.as_raw_fd(), &self.name).is_ok_and(|st| (st.st_dev, st.st_ino) == self.node) {
            // SAFETY: a valid directory fd and a NUL-terminated name.
            unsafe { libc::unlinkat(self.dir.as_raw_fd(), self.name.as_ptr(), 0) };
        }
    }
}

/// Binds the socket at `path` with `mode` and, if given, group `gid`; see the module's doc.
pub fn listen(path: &Path, mode: u32, gid: Option<u32>) -> Result<Listening, Error> {
    let refused = Error::Refused;
    let name = path
        .file_name()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| refused(format!("--socket {} names no file", path.display())))?;
    let name =
        CString::new(name.as_bytes()).map_err(|_| refused(format!("--socket {} holds a NUL", path.display())))?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = open_dir(None, parent.as_os_str())
        .map_err(|e| Error::Io(format!("cannot listen on {}: cannot open {}", path.display(), parent.display()), e))?;
    check_directory(&dir, parent).map_err(refused)?;
    let stale = check_entry(&dir, &name, path)?;

    // A private directory in the same one, for the socket until its mode and group are set.
    let private = make_private_dir(&dir)
        .map_err(|e| Error::Io(format!("cannot listen on {}: cannot make a directory beside it", path.display()), e))?;
    let placed = place_socket(&dir, &private.1, &name, stale, mode, gid, path);
    // SAFETY: a valid directory fd and a NUL-terminated name; the directory is ours and empty
    // once the socket has moved (or failed to be made).
    unsafe { libc::unlinkat(dir.as_raw_fd(), private.0.as_ptr(), libc::AT_REMOVEDIR) };
    let (listener, node) = placed?;
    Ok(Listening { listener, path: path.to_path_buf(), dir, name, node })
}

/// The directory must belong to root or to us, and be writable by no one else unless sticky.
fn check_directory(dir: &OwnedFd, shown: &Path) -> Result<(), String> {
    let st = fstat(dir.as_raw_fd()).map_err(|e| format!("cannot look at {}: {e}", shown.display()))?;
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    if st.st_uid != 0 && st.st_uid != me {
        return Err(format!(
            "{} belongs to uid {}, who could replace the daemon's socket: put it in a directory of root's (/run)",
            shown.display(),
            st.st_uid
        ));
    }
    let sticky = st.st_mode & libc::S_ISVTX != 0;
    if st.st_mode & 0o022 != 0 && !sticky {
        return Err(format!(
            "{} is writable by others (mode {:o}), who could replace the daemon's socket: put it in a directory \
             only root may write to (/run), or a sticky one (/tmp)",
            shown.display(),
            st.st_mode & 0o7777
        ));
    }
    Ok(())
}

/// What is at the socket's path: nothing (`false`), a stale socket of ours (`true`), or
/// something the daemon must not touch (an error that says what).
fn check_entry(dir: &OwnedFd, name: &CString, path: &Path) -> Result<bool, Error> {
    let refuse = |what: String| {
        Error::Refused(format!(
            "{} is {what}: psleak daemon replaces only a stale socket of its own; remove it or choose another --socket",
            path.display()
        ))
    };
    let st = match stat_at(dir.as_raw_fd(), name) {
        Ok(st) => st,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::Io(format!("cannot look at {}", path.display()), e)),
    };
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    match st.st_mode & libc::S_IFMT {
        libc::S_IFSOCK if st.st_uid == me => {}
        libc::S_IFSOCK => return Err(refuse(format!("a socket of uid {}", st.st_uid))),
        libc::S_IFLNK => {
            let target = std::fs::read_link(path).map_or_else(|_| "?".into(), |t| t.display().to_string());
            return Err(refuse(format!("a symbolic link (to {target})")));
        }
        libc::S_IFREG => return Err(refuse("a regular file".into())),
        libc::S_IFDIR => return Err(refuse("a directory".into())),
        _ => return Err(refuse("not a socket".into())),
    }
    match UnixStream::connect(fd_path(dir.as_raw_fd(), name.as_bytes())) {
        Ok(_) => Err(Error::Refused(format!("a psleak daemon already listens on {}", path.display()))),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(true),
        Err(e) => Err(Error::Io(format!("cannot tell whether a daemon listens on {}", path.display()), e)),
    }
}

/// Binds the socket in `private`, sets its mode and group, and moves it to `name` in `dir`.
fn place_socket(
    dir: &OwnedFd,
    private: &OwnedFd,
    name: &CString,
    stale: bool,
    mode: u32,
    gid: Option<u32>,
    path: &Path,
) -> Result<(UnixListener, (u64, u64)), Error> {
    let failed = |what: &str| {
        let what = format!("cannot listen on {}: cannot {what}", path.display());
        move |e| Error::Io(what, e)
    };
    const NODE: &[u8] = b"socket";
    let node = CString::new(NODE).expect("no NUL");
    let listener = UnixListener::bind(fd_path(private.as_raw_fd(), NODE)).map_err(failed("bind"))?;
    let (fd, at) = (private.as_raw_fd(), node.as_ptr());
    // In a directory only we may enter, the name is ours to use: nothing can be swapped in.
    // SAFETY: valid fds and NUL-terminated names, for the duration of each call.
    let set = unsafe {
        gid.is_none_or(|gid| libc::fchownat(fd, at, u32::MAX, gid, libc::AT_SYMLINK_NOFOLLOW) == 0)
            && libc::fchmodat(fd, at, mode, 0) == 0
    };
    let placed = if !set {
        Err(failed("set its group and mode")(io::Error::last_os_error()))
    } else {
        stat_at(fd, &node).map_err(failed("look at it")).and_then(|st| {
            // Over a stale socket of ours, rename; else link, which never replaces what may have
            // appeared at the path meanwhile.
            // SAFETY: as above.
            let moved = unsafe {
                if stale {
                    libc::renameat(fd, at, dir.as_raw_fd(), name.as_ptr())
                } else {
                    libc::linkat(fd, at, dir.as_raw_fd(), name.as_ptr(), 0)
                }
            };
            match moved {
                0 => Ok((st.st_dev, st.st_ino)),
                _ if io::Error::last_os_error().kind() == io::ErrorKind::AlreadyExists => Err(Error::Refused(format!(
                    "{} was taken while the daemon bound its socket: psleak daemon replaces only a stale socket of its own",
                    path.display()
                ))),
                _ => Err(failed("put the socket in place")(io::Error::last_os_error())),
            }
        })
    };
    // SAFETY: as above; after a rename there is nothing to remove, and the call fails harmlessly.
    unsafe { libc::unlinkat(fd, at, 0) };
    placed.map(|node| (listener, node))
}

/// Makes a directory of mode 700 in `dir` under a fresh name: its name and an fd on it.
fn make_private_dir(dir: &OwnedFd) -> io::Result<(CString, OwnedFd)> {
    for attempt in 0..100u32 {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let name = CString::new(format!(".psleak-{}-{nanos}-{attempt}", std::process::id())).expect("no NUL");
        // SAFETY: a valid directory fd and a NUL-terminated name.
        if unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), 0o700) } != 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::AlreadyExists {
                continue;
            }
            return Err(err);
        }
        return open_dir(Some(dir.as_raw_fd()), OsStr::from_bytes(name.as_bytes())).map(|fd| (name, fd));
    }
    Err(io::Error::from(io::ErrorKind::AlreadyExists))
}

/// Opens a directory (relative to `at` when given, without following a final symlink then).
fn open_dir(at: Option<RawFd>, path: &OsStr) -> io::Result<OwnedFd> {
    let path = CString::new(path.as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC;
    // SAFETY: a NUL-terminated path; the result is checked.
    let fd = unsafe {
        match at {
            Some(dir) => libc::openat(dir, path.as_ptr(), flags | libc::O_NOFOLLOW),
            None => libc::open(path.as_ptr(), flags),
        }
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A path to `name` in the directory open at `dir`, for calls that take only paths (bind,
/// connect): through /proc/self/fd, it reaches that very directory, wherever it now is.
fn fd_path(dir: RawFd, name: &[u8]) -> PathBuf {
    let mut path = PathBuf::from(format!("/proc/self/fd/{dir}"));
    path.push(OsStr::from_bytes(name));
    path
}

fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    let mut st = MaybeUninit::uninit();
    // SAFETY: a valid out-pointer; the result is checked before it is read.
    if unsafe { libc::fstat(fd, st.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstat filled it.
    Ok(unsafe { st.assume_init() })
}

/// lstat of `name` in the directory open at `dir`.
fn stat_at(dir: RawFd, name: &CString) -> io::Result<libc::stat> {
    let mut st = MaybeUninit::uninit();
    // SAFETY: a valid out-pointer and a NUL-terminated name; the result is checked.
    if unsafe { libc::fstatat(dir, name.as_ptr(), st.as_mut_ptr(), libc::AT_SYMLINK_NOFOLLOW) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstatat filled it.
    Ok(unsafe { st.assume_init() })
}

/// The gid of a group named by name or number, as the system's group database knows it
/// (files, LDAP...): a gid no group has is refused too.
pub fn group_id(group: &str) -> Result<u32, String> {
    let gid = match group.parse::<u32>() {
        Ok(u32::MAX) => return Err(format!("--socket-group {group}: not a gid")),
        Ok(gid) => Some(gid),
        Err(_) => None,
    };
    let name = CString::new(group).map_err(|_| format!("--socket-group {group:?}: not a group name"))?;
    // A group with many members needs a big buffer: grow it while the lookup says so (ERANGE).
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let mut entry = MaybeUninit::<libc::group>::uninit();
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: valid out-pointers, a buffer of the length given and a NUL-terminated name.
        let rc = unsafe {
            match gid {
                Some(gid) => libc::getgrgid_r(gid, entry.as_mut_ptr(), buf.as_mut_ptr().cast(), buf.len(), &mut found),
                None => {
                    libc::getgrnam_r(name.as_ptr(), entry.as_mut_ptr(), buf.as_mut_ptr().cast(), buf.len(), &mut found)
                }
            }
        };
        if rc == libc::ERANGE && buf.len() < 16 << 20 {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        if rc != 0 || found.is_null() {
            return Err(match gid {
                Some(gid) => format!("no group has gid {gid} (--socket-group)"),
                None => format!("no group named {group} (--socket-group)"),
            });
        }
        // SAFETY: getgr*_r found the entry and filled it.
        return Ok(unsafe { (*found).gr_gid });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_found_by_name_and_number_or_refused() {
        assert_eq!(group_id("root"), Ok(0));
        assert_eq!(group_id("0"), Ok(0));
        assert!(group_id("4000000000").unwrap_err().contains("no group has gid 4000000000"));
        assert!(group_id("4294967295").is_err());
        assert!(group_id("no-such-group").unwrap_err().contains("no group named no-such-group"));
    }
}
