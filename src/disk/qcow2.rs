//! qcow2 images through `imago`, opened read-only.
//!
//! Files the image names (its backing chain, an external data file) are
//! opened through [`CheckedGate`]: each must be a regular file (checked before
//! reading, as every input of ckptfs), the chain is at most
//! [`MAX_CHAIN`] images deep (a loop of backing files ends there), and every
//! file opened is remembered so the fingerprint can cover its metadata.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use imago::qcow2::Qcow2;
use imago::{FormatAccess, FormatDriverBuilder, Mapping, Storage, StorageOpenOptions};
use memmap2::Mmap;
use xxhash_rust::xxh3::Xxh3;

use crate::input;

/// qcow2 magic at offset 0 ("QFI\xfb").
pub const MAGIC: &[u8] = b"QFI\xfb";

/// Deepest backing chain opened (QEMU has no limit; real chains are short).
pub const MAX_CHAIN: usize = 16;

/// Bytes of each file's header that the fingerprint covers.
const HEADER_BYTES: usize = 4096;
/// Bytes of an L1 table the fingerprint covers at most (1 MiB: 128 Ki entries,
/// 8 TiB of disk with 64 KiB clusters).
const MAX_L1_BYTES: u64 = 1 << 20;

/// The files of one qcow2 chain, top first, for the fingerprint.
#[derive(Default)]
struct Opened {
    files: Vec<(PathBuf, File)>,
    formats: usize,
    too_deep: bool,
}

fn too_deep() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("backing chain deeper than {MAX_CHAIN} images (a loop?)"),
    )
}

/// Opens what a qcow2 image refers to, checking each file first.
#[derive(Clone, Default)]
struct CheckedGate(Arc<Mutex<Opened>>);

impl CheckedGate {
    fn opened(&self) -> std::sync::MutexGuard<'_, Opened> {
        // A poisoned lock only means another open panicked; the list is still valid.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Open `path` (checked to be a regular file) as imago storage and remember it.
    fn storage(&self, path: &Path, file: File) -> io::Result<imago::file::File> {
        let mine = file.try_clone()?;
        let opts = StorageOpenOptions::new().filename(path).write(false);
        let storage = imago::file::File::from_open_file(file, opts)?;
        self.opened().files.push((path.to_owned(), mine));
        Ok(storage)
    }
}

impl imago::format::gate::ImplicitOpenGate<imago::file::File> for CheckedGate {
    fn open_format<F: FormatDriverBuilder<imago::file::File>>(
        &mut self,
        builder: F,
    ) -> io::Result<FormatAccess<imago::file::File>> {
        {
            let mut o = self.opened();
            o.formats += 1;
            if o.formats > MAX_CHAIN {
                o.too_deep = true;
                return Err(too_deep());
            }
        }
        Ok(FormatAccess::new(builder.write(false).open(self.clone())?))
    }

    fn open_storage(&mut self, opts: StorageOpenOptions) -> io::Result<imago::file::File> {
        let path = opts
            .get_filename()
            .ok_or_else(|| io::Error::other("a referenced file has no name"))?
            .to_owned();
        let (file, _) = input::open_regular(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        self.storage(&path, file)
    }
}

/// A qcow2 image open read-only, with its backing chain.
pub struct Qcow2Image {
    access: FormatAccess<imago::file::File>,
    files: Vec<(PathBuf, File)>,
    /// Each file of the chain mapped read-only (same order as `files`), so a
    /// window in an uncompressed cluster is compared in place (the scan).
    maps: Vec<Option<Mmap>>,
}

impl Qcow2Image {
    /// Open the qcow2 image `file` (already checked to be a regular file) found at `path`.
    pub fn open(path: &Path, file: File) -> io::Result<Self> {
        let gate = CheckedGate::default();
        gate.opened().formats = 1;
        let storage = gate.storage(path, file)?;
        let image = Qcow2::<imago::file::File>::builder(storage)
            .write(false)
            .open(gate.clone())
            // imago names every file of the chain on the way out: say it once.
            .map_err(|e| {
                if gate.opened().too_deep {
                    too_deep()
                } else {
                    e
                }
            })?;
        let access = FormatAccess::new(image);
        let files = std::mem::take(&mut gate.opened().files);
        let maps = files
            .iter()
            .map(|(_, f)| {
                // SAFETY: a read-only map of a file opened read-only and only
                // read through it; a concurrent writer could change bytes under
                // us, which at worst misclassifies a page: every page read back
                // is CRC-checked.
                unsafe { Mmap::map(f) }.ok()
            })
            .collect();
        Ok(Qcow2Image {
            access,
            files,
            maps,
        })
    }

    /// The `len` bytes of the virtual disk at `offset` as a slice of a mapped
    /// file, when they lie in one uncompressed cluster run (else `None`: read them).
    pub fn mapped(&self, offset: u64, len: usize) -> Option<&[u8]> {
        let (mapping, n) = self.access.get_mapping(offset, len as u64).ok()?;
        let Mapping::Raw {
            storage,
            offset: host,
            ..
        } = mapping
        else {
            return None;
        };
        if n < len as u64 {
            return None;
        }
        let name = storage.get_filename()?;
        let i = self.files.iter().position(|(p, _)| *p == name)?;
        let map = self.maps[i].as_ref()?;
        map.get(usize::try_from(host).ok()?..usize::try_from(host).ok()?.checked_add(len)?)
    }

    /// Virtual disk size.
    pub fn size(&self) -> u64 {
        self.access.size()
    }

    /// Read the virtual disk at `offset` (bounds checked by the caller).
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.access.read(buf, offset)
    }

    /// Hash what every allocating write or a rebase changes: each file's
    /// length, its first 4 KiB (header, extensions, backing file name) and,
    /// for qcow2 files, the L1 table.
    pub fn hash_metadata(&self, h: &mut Xxh3) -> io::Result<()> {
        let mut buf = vec![0u8; HEADER_BYTES];
        for (_, f) in &self.files {
            h.update(&f.metadata()?.len().to_le_bytes());
            let n = input::read_up_to(f, &mut buf, 0)?;
            h.update(&buf[..n]);
            if n >= 48 && buf.starts_with(MAGIC) {
                // Header fields are big endian: l1_size at 36, l1_table_offset at 40.
                let l1_size = u32::from_be_bytes(buf[36..40].try_into().expect("4 bytes"));
                let l1_offset = u64::from_be_bytes(buf[40..48].try_into().expect("8 bytes"));
                let len = (u64::from(l1_size) * 8).min(MAX_L1_BYTES) as usize;
                let mut l1 = vec![0u8; len];
                let n = input::read_up_to(f, &mut l1, l1_offset)?;
                h.update(&l1[..n]);
            }
        }
        Ok(())
    }
}
