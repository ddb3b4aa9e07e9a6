//! A guest path to the entry it names, one name at a time through [`Tree::lookup`], as the
//! kernel resolves one: `.` and `..` taken by name, symlinks followed inside the guest (an
//! absolute target from the guest's root, never the host's), at most [`MAX_LINKS`] of them so
//! a symlink loop ends. Done here once for every file system, so they all behave alike.

use std::collections::VecDeque;

use super::error::GuestError;
use super::tree::shown;
use super::tree::{FsResult, GuestPath, Meta, Node, Tree};

/// Most symlinks followed for one path (Linux's limit).
pub const MAX_LINKS: usize = 40;

/// The entry guest `path` (absolute, bytes) names: its resolved path and metadata. A final
/// symlink is followed when `follow_last`.
pub fn resolve(tree: &dyn Tree, path: &[u8], follow_last: bool) -> FsResult<(GuestPath, Meta)> {
    let mut stack = vec![(GuestPath::root(), tree.root()?)];
    let mut pending = names(path);
    let mut links = 0;
    while let Some(name) = pending.pop_front() {
        if name == b"." {
            continue;
        }
        if name == b".." {
            if stack.len() > 1 {
                stack.pop();
            }
            continue;
        }
        let (dir_path, dir_meta) = stack.last().expect("the root is never popped");
        if !dir_meta.is_dir() {
            return Err(GuestError::NotADirectory(shown(path)).into());
        }
        let dir = Node {
            path: dir_path,
            meta: dir_meta,
        };
        let Some(meta) = tree.lookup(dir, &name)? else {
            return Err(GuestError::NotFound(shown(path)).into());
        };
        let child = dir_path.join(&name);
        if meta.is_symlink() && (follow_last || !pending.is_empty()) {
            links += 1;
            if links > MAX_LINKS {
                return Err(GuestError::TooManyLinks(shown(path)).into());
            }
            let target = link_target(
                tree,
                Node {
                    path: &child,
                    meta: &meta,
                },
            )?;
            if target.is_empty() {
                return Err(GuestError::NotFound(shown(path)).into());
            }
            if target.starts_with(b"/") {
                stack.truncate(1);
            }
            for n in names(&target).into_iter().rev() {
                pending.push_front(n);
            }
            continue;
        }
        stack.push((child, meta));
    }
    Ok(stack.pop().expect("the stack holds the root at least"))
}

/// The longest symlink target read (Linux's PATH_MAX; ext4 and XFS keep them shorter).
const MAX_LINK: u64 = 4096;

/// The target of `link`, refused when its inode claims more than [`MAX_LINK`] bytes: a library
/// reads a target whole, at the length its inode claims, so a hostile length would be its
/// allocation (2 GiB in one fuzzed ext4 image).
pub(crate) fn link_target(tree: &dyn Tree, link: Node) -> FsResult<Vec<u8>> {
    if link.meta.len > MAX_LINK {
        let e = GuestError::LinkTooLong {
            path: shown(link.path.as_bytes()),
            len: link.meta.len,
        };
        return Err(e.into());
    }
    tree.read_link(link)
}

/// The names of a path, empty ones (from `//` or a trailing `/`) left out.
fn names(path: &[u8]) -> VecDeque<Vec<u8>> {
    path.split(|&b| b == b'/')
        .filter(|n| !n.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::tree::{FileData, Kind, Time};
    use super::*;

    /// A tree of folders and symlinks given as (path, symlink target or None).
    struct Fake(Vec<(&'static str, Option<&'static str>)>);

    fn meta(kind: Kind) -> Meta {
        Meta {
            kind,
            mode: 0o755,
            uid: 0,
            gid: 0,
            len: 0,
            atime: Time::default(),
            mtime: Time::default(),
            links: 1,
            id: None,
        }
    }

    impl Tree for Fake {
        fn name(&self) -> &'static str {
            "fake"
        }
        fn root(&self) -> FsResult<Meta> {
            Ok(meta(Kind::Dir))
        }
        fn lookup(&self, dir: Node, name: &[u8]) -> FsResult<Option<Meta>> {
            let p = dir.path.join(name);
            Ok(self
                .0
                .iter()
                .find(|(q, _)| q.as_bytes() == p.as_bytes())
                .map(|(_, link)| match link {
                    Some(_) => meta(Kind::Symlink),
                    None if p.as_bytes().ends_with(b"file") => meta(Kind::File),
                    None => meta(Kind::Dir),
                }))
        }
        fn read_dir(
            &self,
            _: Node,
            _: &mut dyn FnMut(Vec<u8>, Meta) -> FsResult<()>,
        ) -> FsResult<()> {
            Ok(())
        }
        fn read_link(&self, link: Node) -> FsResult<Vec<u8>> {
            let (_, t) = self
                .0
                .iter()
                .find(|(q, _)| q.as_bytes() == link.path.as_bytes())
                .unwrap();
            Ok(t.unwrap().as_bytes().to_vec())
        }
        fn open<'a>(&'a self, _: Node) -> FsResult<Box<dyn FileData + 'a>> {
            unreachable!()
        }
        fn max_dirs(&self) -> u64 {
            100
        }
    }

    fn tree() -> Fake {
        Fake(vec![
            ("/etc", None),
            ("/etc/file", None),
            ("/var", None),
            ("/var/run", Some("../run")),
            ("/run", None),
            ("/abs", Some("/etc")),
            ("/loop", Some("loop")),
            ("/rel", Some("etc/file")),
        ])
    }

    fn path(p: &str, follow: bool) -> String {
        match resolve(&tree(), p.as_bytes(), follow) {
            Ok((r, _)) => String::from_utf8(r.as_bytes().to_vec()).unwrap(),
            Err(e) => format!("error: {e}"),
        }
    }

    #[test]
    fn symlinks_resolve_inside_the_guest() {
        assert_eq!(path("/etc/file", false), "/etc/file");
        assert_eq!(path("/var/run", false), "/var/run");
        assert_eq!(path("/var/run", true), "/run");
        assert_eq!(path("/var/run/", false), "/var/run");
        assert_eq!(path("/abs/file", false), "/etc/file");
        assert_eq!(path("/rel", true), "/etc/file");
        assert_eq!(path("/../../etc/./file", false), "/etc/file");
        assert_eq!(path("/", false), "/");
    }

    #[test]
    fn missing_names_files_as_folders_and_loops_are_errors() {
        assert_eq!(path("/nope", false), "error: /nope: file not found");
        assert_eq!(
            path("/etc/file/x", false),
            "error: /etc/file/x: path is not a directory"
        );
        assert!(path("/loop/x", false).contains("too many levels of symbolic links"));
        assert_eq!(path("/loop", false), "/loop");
    }
}
