//! Restore targets on this machine: a file or block device (positional writes), and an
//! ordered stream (stdout, a pipe, or a file holding an import-diff stream).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_repo::Manifest;

use crate::error::{Error, ErrorKind, Result};
use crate::restore::{Layout, RestoreTarget, StreamFormat};

fn io_error(what: String, e: std::io::Error) -> Error {
    Error::new(ErrorKind::Failed, what, Some(Box::new(e)))
}

/// A restore target file: a block device as it is; otherwise a temporary file beside the
/// path, renamed over it only when the restore is complete, so a killed or failed restore
/// never leaves a full-size file that looks complete (and `--force` keeps the old content
/// until the new one is whole).
struct Opened {
    file: File,
    is_device: bool,
    /// The temporary path being written (renamed to the target by `commit`).
    partial: Option<PathBuf>,
}

/// The temporary name of a restore in progress: `<path>.ferry-partial`.
pub fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".ferry-partial");
    path.with_file_name(name)
}

fn open_path(path: &Path, force: bool) -> Result<Opened> {
    match std::fs::metadata(path) {
        Ok(md) if md.file_type().is_block_device() => {
            let f = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| io_error(format!("opening block device {}", path.display()), e))?;
            return Ok(Opened {
                file: f,
                is_device: true,
                partial: None,
            });
        }
        Ok(md) if md.is_dir() => return Err(Error::refused(format!("{} is a directory", path.display()))),
        Ok(md) if md.is_file() && md.len() > 0 && !force => {
            return Err(Error::refused(format!(
                "{} exists and is not empty; use --force to overwrite it",
                path.display()
            )))
        }
        Ok(md) if !md.is_file() => {
            return Err(Error::refused(format!(
                "{} is neither a regular file nor a block device",
                path.display()
            )))
        }
        _ => {}
    }
    let partial = partial_path(path);
    // A partial file of an earlier, interrupted restore is ours to replace.
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&partial)
        .map_err(|e| io_error(format!("creating {}", partial.display()), e))?;
    Ok(Opened {
        file: f,
        is_device: false,
        partial: Some(partial),
    })
}

/// Starts writing `len` bytes at `offset` of `file` back to disk now, without waiting
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`): the disk works while later blocks decode, and
/// the final `fsync` finds little left. Only a hint; durability comes from that `fsync`.
pub(crate) fn start_writeback(file: &File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::io::AsRawFd;
        let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
            return;
        };
        // SAFETY: a valid file descriptor; the call only schedules writeback of the range.
        unsafe {
            libc::sync_file_range(file.as_raw_fd(), off, n, libc::SYNC_FILE_RANGE_WRITE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}

/// Makes a finished restore file durable and puts it in place.
fn commit_partial(file: &File, partial: &Path, path: &Path) -> Result<()> {
    file.sync_all().map_err(|e| io_error(format!("syncing {}", partial.display()), e))?;
    std::fs::rename(partial, path).map_err(|e| io_error(format!("renaming {} to {}", partial.display(), path.display()), e))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

fn remove_partial(partial: &Path) -> String {
    match std::fs::remove_file(partial) {
        Ok(()) => format!("the partial output {} was removed", partial.display()),
        Err(e) => format!("the partial output {} could not be removed: {e}", partial.display()),
    }
}

fn device_size(f: &File) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = f.try_clone()?;
    f.seek(SeekFrom::End(0))
}

/// A raw restore into a regular file (sparse: holes are skipped) or a block device (every
/// byte written, holes as zeros; the device must be at least the volume's size).
pub struct FileTarget {
    path: PathBuf,
    force: bool,
    file: Option<Arc<File>>,
    partial: Option<PathBuf>,
}

impl FileTarget {
    /// A target at `path`; an existing non-empty regular file is overwritten only with `force`
    /// (and only once the restore is complete: it is written as `<path>.ferry-partial`
    /// first).
    pub fn new(path: impl Into<PathBuf>, force: bool) -> FileTarget {
        FileTarget {
            path: path.into(),
            force,
            file: None,
            partial: None,
        }
    }
}

impl RestoreTarget for FileTarget {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn open(&mut self, manifest: &Manifest) -> Result<Layout> {
        let Opened { file, is_device, partial } = open_path(&self.path, self.force)?;
        self.partial = partial;
        let size = manifest.meta.image_size;
        if is_device {
            let dev_len = device_size(&file).map_err(|e| io_error(format!("sizing block device {}", self.path.display()), e))?;
            if dev_len < size {
                return Err(Error::refused(format!(
                    "block device {} holds {dev_len} bytes, the backup needs {size}",
                    self.path.display()
                )));
            }
        } else {
            // Sparse: size first, then write only the blocks that hold data.
            file.set_len(size).map_err(|e| io_error(format!("sizing {}", self.describe()), e))?;
        }
        let file = Arc::new(file);
        self.file = Some(file.clone());
        Ok(Layout::Positional {
            file,
            write_holes: is_device,
        })
    }

    fn finish(&mut self) -> Result<()> {
        let Some(f) = self.file.take() else {
            return Ok(());
        };
        match self.partial.take() {
            Some(partial) => commit_partial(&f, &partial, &self.path),
            None => f.sync_all().map_err(|e| io_error(format!("syncing {}", self.path.display()), e)),
        }
    }

    fn abandon(&mut self) -> Option<String> {
        self.file = None;
        self.partial.take().map(|p| remove_partial(&p))
    }
}

/// An ordered restore into any writer (stdout, a pipe) or into a file it creates.
pub struct StreamTarget {
    name: String,
    out: Option<Box<dyn Write + Send>>,
    path: Option<(PathBuf, bool)>,
    /// For a file: the file being written and its temporary path.
    file: Option<(File, PathBuf)>,
    format: StreamFormat,
    snap_name: Option<String>,
}

impl StreamTarget {
    /// A stream into `out`, named `name` in messages (e.g. "-" for stdout).
    pub fn new(name: impl Into<String>, out: Box<dyn Write + Send>, format: StreamFormat, snap_name: Option<String>) -> StreamTarget {
        StreamTarget {
            name: name.into(),
            out: Some(out),
            path: None,
            file: None,
            format,
            snap_name,
        }
    }

    /// A stream into a file (created, or replaced with `force` once complete).
    pub fn file(path: impl Into<PathBuf>, force: bool, format: StreamFormat, snap_name: Option<String>) -> StreamTarget {
        let path = path.into();
        StreamTarget {
            name: path.display().to_string(),
            out: None,
            path: Some((path, force)),
            file: None,
            format,
            snap_name,
        }
    }
}

impl RestoreTarget for StreamTarget {
    fn describe(&self) -> String {
        self.name.clone()
    }

    fn open(&mut self, _manifest: &Manifest) -> Result<Layout> {
        if let Some((path, force)) = &self.path {
            let Opened { file, partial, .. } = open_path(path, *force)?;
            match partial {
                Some(partial) => {
                    let w = file
                        .try_clone()
                        .map_err(|e| io_error(format!("opening {}", partial.display()), e))?;
                    self.out = Some(Box::new(w));
                    self.file = Some((file, partial));
                }
                None => self.out = Some(Box::new(file)),
            }
        }
        Ok(Layout::Ordered {
            format: self.format,
            snap_name: self.snap_name.clone(),
        })
    }

    fn write(&mut self, buf: &[u8]) -> std::io::Result<()> {
        match &mut self.out {
            Some(o) => o.write_all(buf),
            None => Err(std::io::Error::other("restore stream is closed")),
        }
    }

    fn finish(&mut self) -> Result<()> {
        if let Some(mut o) = self.out.take() {
            o.flush().map_err(|e| io_error(format!("writing {}", self.name), e))?;
        }
        if let (Some((file, partial)), Some((path, _))) = (self.file.take(), &self.path) {
            commit_partial(&file, &partial, path)?;
        }
        Ok(())
    }

    fn abandon(&mut self) -> Option<String> {
        self.out = None;
        self.file.take().map(|(_, p)| remove_partial(&p))
    }
}
