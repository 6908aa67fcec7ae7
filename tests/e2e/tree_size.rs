//! The tracked working tree stays small enough to be copied to the GPU test machine: at most
//! 45 MiB of tracked files (a symlink counted as its link, not its target), and no large fixture
//! stored twice (identical files under tests/fixtures are relative symlinks to one copy; see
//! tools/reference/dedupe_fixtures.py).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The most the tracked tree may weigh.
const MAX_TREE_BYTES: u64 = 45 * 1024 * 1024;
/// Identical regular files under tests/fixtures above this size are refused.
const MAX_DUPLICATE_BYTES: u64 = 64 * 1024;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the kd-e2e crate lives one folder below the repository root")
        .to_path_buf()
}

/// Every tracked path (relative to the repository root). Fails, never skips, without git or
/// outside a checkout: CI always runs in a clone, so a silent pass would hide a real failure.
fn tracked_files(root: &Path) -> Vec<PathBuf> {
    let out = Command::new("git")
        .args(["ls-files", "-z"])
        .current_dir(root)
        .output()
        .unwrap_or_else(|e| {
            panic!("tree_size needs git to list the tracked files, but `git` could not run: {e}")
        });
    assert!(
        out.status.success(),
        "`git ls-files -z` failed in {} ({}): is this a git checkout?\n{}",
        root.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let files: Vec<PathBuf> = out
        .stdout
        .split(|&b| b == 0)
        .filter(|p| !p.is_empty())
        .map(|p| PathBuf::from(String::from_utf8_lossy(p).into_owned()))
        .collect();
    assert!(
        !files.is_empty(),
        "`git ls-files` in {} listed no files: not the kandinsky-serve checkout?",
        root.display()
    );
    files
}

fn mib(bytes: u64) -> String {
    format!("{:.2} MiB", bytes as f64 / (1024.0 * 1024.0))
}

#[test]
fn tracked_tree_fits_the_gpu_machine() {
    let root = repo_root();
    let mut sizes: Vec<(u64, PathBuf)> = Vec::new();
    for path in tracked_files(&root) {
        match std::fs::symlink_metadata(root.join(&path)) {
            Ok(meta) => sizes.push((meta.len(), path)),
            // Tracked but deleted in this working tree: nothing to copy.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("{}: {e}", path.display()),
        }
    }
    let total: u64 = sizes.iter().map(|(len, _)| len).sum();
    sizes.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    let largest: Vec<String> = sizes
        .iter()
        .take(10)
        .map(|(len, path)| format!("  {:>10}  {}", len, path.display()))
        .collect();
    assert!(
        total <= MAX_TREE_BYTES,
        "the tracked tree is {} ({total} bytes over {} files), over the {} limit \
         (it must fit the GPU machine's working-tree copy). The 10 largest files:\n{}\n\
         Identical fixtures can be symlinked with `python3 tools/reference/dedupe_fixtures.py`.",
        mib(total),
        sizes.len(),
        mib(MAX_TREE_BYTES),
        largest.join("\n")
    );
}

#[test]
fn no_large_fixture_is_stored_twice() {
    let root = repo_root();
    // Regular files only: a symlink is how a second copy is meant to be stored.
    let mut by_len: HashMap<u64, Vec<PathBuf>> = HashMap::new();
    for path in tracked_files(&root) {
        if !path.starts_with("tests/fixtures") {
            continue;
        }
        let Ok(meta) = std::fs::symlink_metadata(root.join(&path)) else {
            continue; // deleted in this working tree
        };
        if meta.file_type().is_file() && meta.len() > MAX_DUPLICATE_BYTES {
            by_len.entry(meta.len()).or_default().push(path);
        }
    }
    let mut duplicates: Vec<Vec<PathBuf>> = Vec::new();
    for paths in by_len.into_values().filter(|p| p.len() > 1) {
        let mut by_content: HashMap<Vec<u8>, Vec<PathBuf>> = HashMap::new();
        for path in paths {
            let bytes = std::fs::read(root.join(&path))
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            by_content.entry(bytes).or_default().push(path);
        }
        duplicates.extend(by_content.into_values().filter(|p| p.len() > 1));
    }
    for group in &mut duplicates {
        group.sort();
    }
    duplicates.sort();
    let listing: Vec<String> = duplicates
        .iter()
        .map(|group| {
            let names: Vec<String> = group.iter().map(|p| p.display().to_string()).collect();
            format!("  {}", names.join(" == "))
        })
        .collect();
    assert!(
        duplicates.is_empty(),
        "identical tracked files over {} KiB under tests/fixtures (make the copies relative \
         symlinks with `python3 tools/reference/dedupe_fixtures.py`):\n{}",
        MAX_DUPLICATE_BYTES / 1024,
        listing.join("\n")
    );
}

#[test]
fn fixture_symlinks_point_at_tracked_files() {
    // A link to an untracked or absolute path would dangle in a fresh clone.
    let root = repo_root();
    let tracked = tracked_files(&root);
    let tracked_set: std::collections::HashSet<&Path> =
        tracked.iter().map(PathBuf::as_path).collect();
    let mut bad: Vec<String> = Vec::new();
    for path in tracked.iter().filter(|p| p.starts_with("tests/fixtures")) {
        let full = root.join(path);
        let Ok(meta) = std::fs::symlink_metadata(&full) else {
            continue;
        };
        if !meta.file_type().is_symlink() {
            continue;
        }
        let target = std::fs::read_link(&full).unwrap();
        if target.is_absolute() {
            bad.push(format!(
                "  {} -> {} (absolute)",
                path.display(),
                target.display()
            ));
            continue;
        }
        // Resolve `..` lexically against the link's folder, relative to the repository root.
        let mut resolved = path.parent().unwrap_or(Path::new("")).to_path_buf();
        for part in target.components() {
            match part {
                std::path::Component::ParentDir => {
                    resolved.pop();
                }
                std::path::Component::CurDir => {}
                other => resolved.push(other),
            }
        }
        let is_file = std::fs::symlink_metadata(root.join(&resolved))
            .map(|m| m.file_type().is_file())
            .unwrap_or(false);
        // A link to a folder (a shared component folder) must hold tracked files.
        let is_dir = std::fs::symlink_metadata(root.join(&resolved))
            .map(|m| m.file_type().is_dir())
            .unwrap_or(false);
        let tracked_dir = is_dir && tracked.iter().any(|t| t.starts_with(&resolved));
        if !(tracked_dir || tracked_set.contains(resolved.as_path()) && is_file) {
            bad.push(format!(
                "  {} -> {} (not a tracked regular file nor a folder of tracked files)",
                path.display(),
                target.display()
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "fixture symlinks must be relative links to tracked regular files or folders:\n{}",
        bad.join("\n")
    );
}
