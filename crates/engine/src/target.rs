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

/// Opens a path for a restore: a block device as it is; an existing non-empty regular file
/// only with `force`; otherwise creates it. Returns the file, whether it is a block device,
/// and whether ferry created it.
fn open_path(path: &Path, force: bool) -> Result<(File, bool, bool)> {
    match std::fs::metadata(path) {
        Ok(md) if md.file_type().is_block_device() => {
            let f = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| io_error(format!("opening block device {}", path.display()), e))?;
            Ok((f, true, false))
        }
        Ok(md) if md.is_dir() => Err(Error::refused(format!("{} is a directory", path.display()))),
        Ok(md) if md.is_file() && md.len() > 0 && !force => Err(Error::refused(format!(
            "{} exists and is not empty; use --force to overwrite it",
            path.display()
        ))),
        Ok(_) => {
            let f = OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(path)
                .map_err(|e| io_error(format!("opening {}", path.display()), e))?;
            Ok((f, false, false))
        }
        Err(_) => {
            let f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .map_err(|e| io_error(format!("creating {}", path.display()), e))?;
            Ok((f, false, true))
        }
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
    created: bool,
}

impl FileTarget {
    /// A target at `path`; an existing non-empty regular file is overwritten only with `force`.
    pub fn new(path: impl Into<PathBuf>, force: bool) -> FileTarget {
        FileTarget {
            path: path.into(),
            force,
            file: None,
            created: false,
        }
    }
}

impl RestoreTarget for FileTarget {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn open(&mut self, manifest: &Manifest) -> Result<Layout> {
        let (file, is_dev, created) = open_path(&self.path, self.force)?;
        self.created = created;
        let size = manifest.meta.image_size;
        if is_dev {
            let dev_len = device_size(&file).map_err(|e| io_error(format!("sizing block device {}", self.path.display()), e))?;
            if dev_len < size {
                return Err(Error::refused(format!(
                    "block device {} holds {dev_len} bytes, the backup needs {size}",
                    self.path.display()
                )));
            }
        } else {
            // Sparse: size first, then write only the blocks that hold data.
            file.set_len(size)
                .map_err(|e| io_error(format!("sizing {}", self.path.display()), e))?;
        }
        let file = Arc::new(file);
        self.file = Some(file.clone());
        Ok(Layout::Positional { file, write_holes: is_dev })
    }

    fn finish(&mut self) -> Result<()> {
        if let Some(f) = &self.file {
            f.sync_all().map_err(|e| io_error(format!("syncing {}", self.path.display()), e))?;
        }
        Ok(())
    }

    fn abandon(&mut self) -> Option<String> {
        self.file = None;
        if !self.created {
            return None;
        }
        self.created = false;
        Some(match std::fs::remove_file(&self.path) {
            Ok(()) => format!("the partial output {} was removed", self.path.display()),
            Err(e) => format!("the partial output {} could not be removed: {e}", self.path.display()),
        })
    }
}

/// An ordered restore into any writer (stdout, a pipe) or into a file it creates.
pub struct StreamTarget {
    name: String,
    out: Option<Box<dyn Write + Send>>,
    path: Option<(PathBuf, bool)>,
    created: bool,
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
            created: false,
            format,
            snap_name,
        }
    }

    /// A stream into a file (created, or overwritten with `force`).
    pub fn file(path: impl Into<PathBuf>, force: bool, format: StreamFormat, snap_name: Option<String>) -> StreamTarget {
        let path = path.into();
        StreamTarget {
            name: path.display().to_string(),
            out: None,
            path: Some((path, force)),
            created: false,
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
            let (file, _, created) = open_path(path, *force)?;
            self.created = created;
            self.out = Some(Box::new(file));
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
        Ok(())
    }

    fn abandon(&mut self) -> Option<String> {
        self.out = None;
        match &self.path {
            Some((p, _)) if self.created => {
                self.created = false;
                Some(match std::fs::remove_file(p) {
                    Ok(()) => format!("the partial output {} was removed", p.display()),
                    Err(e) => format!("the partial output {} could not be removed: {e}", p.display()),
                })
            }
            _ => None,
        }
    }
}
