//! Parent checkpoints: opened and checked at open, and every PARENT entry
//! resolved to where its bytes really are, so a read never walks the chain.
//!
//! A parent is opened as a whole [`Checkpoint`] (so its own PARENT entries are
//! already resolved), checked against the parent table (file size, identity,
//! sampled fingerprint), and then taken apart: its file joins this
//! checkpoint's [`Ancestor`]s, its disks join this checkpoint's disks (a disk
//! both reference, by path, format, size and fingerprint, is opened once). A
//! parent's ZERO entry resolves to ZERO, its DISK entry is copied, its BLOB
//! entry becomes a blob of that ancestor file, at a byte offset in its blob
//! section. The resolved sources live in one `u64` a page (only when the
//! checkpoint has parents), packed like page-table words.

use crate::format::{Location, ParentRecord};
use crate::types::{AncestorIndex, BlobIndex, DiskIndex, DiskOffset, PageIndex, SECTOR_SIZE};

use super::{Ancestor, Checkpoint, Missing, OpenError, OpenOptions, OpenWalk, PageSource};

/// Longest chain of parents followed.
pub const MAX_PARENT_DEPTH: usize = 16;
/// Most ancestor files one open maps (a table can list the same parent many
/// times, each with parents of its own: the work stays bounded).
pub const MAX_ANCESTORS: usize = 64;

const KIND_SHIFT: u32 = 62;
const INDEX_SHIFT: u32 = 48;
const LOW_MASK: u64 = (1 << INDEX_SHIFT) - 1;
const MAX_INDEX: usize = 1 << (KIND_SHIFT - INDEX_SHIFT);
const R_ZERO: u64 = 0;
const R_DISK: u64 = 1;
const R_BLOB: u64 = 2;
const R_INVALID: u64 = 3;

/// Why a PARENT entry did not resolve (the low bits of an invalid word).
const REASONS: &[&str] = &[
    "PARENT entry names a parent the parent table does not list",
    "PARENT entry for a page beyond the parent's guest memory",
    "the parent checkpoint could not be opened",
    "the parent's entry for this page is invalid",
    "too many disks or ancestor files to resolve",
];

fn invalid(reason: usize) -> u64 {
    (R_INVALID << KIND_SHIFT) | reason as u64
}

fn pack(kind: u64, index: usize, low: u64) -> u64 {
    if index >= MAX_INDEX || low > LOW_MASK {
        return invalid(4);
    }
    (kind << KIND_SHIFT) | ((index as u64) << INDEX_SHIFT) | low
}

/// Resolved sources of PARENT entries, one word a page (empty without parents).
#[derive(Debug, Default)]
pub(super) struct Resolved {
    words: Vec<u64>,
}

impl Resolved {
    /// The resolved source of `page`, whose stored entry is PARENT.
    pub(super) fn get(&self, page: u64) -> Result<PageSource, String> {
        let Some(&w) = self.words.get(page as usize) else {
            return Err(REASONS[0].into());
        };
        let index = ((w >> INDEX_SHIFT) & (MAX_INDEX as u64 - 1)) as u16;
        let low = w & LOW_MASK;
        match w >> KIND_SHIFT {
            R_ZERO => Ok(PageSource::Zero),
            R_DISK => Ok(PageSource::Disk {
                disk: DiskIndex(index),
                offset: DiskOffset(low * SECTOR_SIZE),
            }),
            R_BLOB => Ok(PageSource::ParentBlob {
                ancestor: AncestorIndex(index),
                blob: BlobIndex(low),
            }),
            _ => Err(REASONS[(low as usize).min(REASONS.len() - 1)].into()),
        }
    }
}

/// An opened parent and where its disks and files land in the child.
struct Planned {
    ck: Checkpoint,
    disk_map: Vec<usize>,
    /// Index of the parent's own file among the child's ancestors.
    ancestor_base: usize,
}

impl Planned {
    fn resolve(&self, page: u64) -> u64 {
        if page >= self.ck.page_count() {
            return invalid(1);
        }
        match self.ck.try_entry(PageIndex(page)).map(|e| e.source) {
            Ok(PageSource::Zero) => R_ZERO << KIND_SHIFT,
            Ok(PageSource::Disk { disk, offset }) => pack(
                R_DISK,
                self.disk_map[usize::from(disk.0)],
                offset.0 / SECTOR_SIZE,
            ),
            Ok(PageSource::Blob(b)) => pack(R_BLOB, self.ancestor_base, b.0),
            Ok(PageSource::ParentBlob { ancestor, blob }) => pack(
                R_BLOB,
                self.ancestor_base + 1 + usize::from(ancestor.0),
                blob.0,
            ),
            Err(_) => invalid(3),
        }
    }
}

impl Checkpoint {
    /// Open every parent, resolve every PARENT entry, and adopt the parents'
    /// files and disks. `walk` counts ancestor files left to open and holds the
    /// disks already opened.
    pub(super) fn open_parents(
        &mut self,
        opts: &OpenOptions,
        depth: usize,
        walk: &mut OpenWalk,
    ) -> Result<(), OpenError> {
        if self.parent_records.is_empty() {
            return Ok(());
        }
        if depth >= MAX_PARENT_DEPTH || walk.budget < self.parent_records.len() {
            return Err(OpenError::ParentChain {
                path: self.path.clone(),
            });
        }
        walk.budget -= self.parent_records.len();
        let mut opened = Vec::with_capacity(self.parent_records.len());
        for rec in self.parent_records.clone() {
            match self.open_parent(&rec, opts, depth, walk) {
                Ok(ck) => opened.push(Some(ck)),
                Err(e) if opts.allow_missing => {
                    self.missing.push(Missing {
                        what: "parent checkpoint",
                        path: rec.path.clone(),
                        reason: super::error_chain(&e),
                    });
                    opened.push(None);
                }
                Err(e) => return Err(e),
            }
        }
        let planned = self.plan(opened);
        self.resolve_all(&planned);
        self.adopt(planned);
        Ok(())
    }

    fn open_parent(
        &self,
        rec: &ParentRecord,
        opts: &OpenOptions,
        depth: usize,
        walk: &mut OpenWalk,
    ) -> Result<Checkpoint, OpenError> {
        let parent_opts = OpenOptions {
            disk_override: None,
            ..opts.clone()
        };
        let ck = Checkpoint::open_at_depth(&rec.path, &parent_opts, depth + 1, walk).map_err(
            |e| match e {
                OpenError::ParentChain { .. } => e,
                e => OpenError::Parent {
                    path: self.path.clone(),
                    source: Box::new(e),
                },
            },
        )?;
        let changed = |what: String| OpenError::ParentChanged {
            path: self.path.clone(),
            parent: rec.path.clone(),
            what,
        };
        if ck.file_size() != rec.size {
            return Err(changed(format!(
                "size is {} bytes, was {}",
                ck.file_size(),
                rec.size
            )));
        }
        if ck.identity() != rec.identity {
            return Err(changed("its header (identity) differs".into()));
        }
        if ck.content_fingerprint() != rec.fingerprint {
            return Err(changed("content fingerprint differs".into()));
        }
        Ok(ck)
    }

    /// The record a child made from this checkpoint keeps of it.
    pub fn parent_record(&self) -> std::io::Result<ParentRecord> {
        Ok(ParentRecord {
            path: std::path::absolute(&self.path)?,
            size: self.file_size(),
            identity: self.identity(),
            fingerprint: self.content_fingerprint(),
        })
    }

    /// Sampled fingerprint of the whole file (64 blocks spread over it, so the
    /// blob section too): a parent whose blobs were rewritten is refused at open.
    pub fn content_fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// Decide where each parent's disks and files will sit in this checkpoint.
    fn plan(&self, opened: Vec<Option<Checkpoint>>) -> Vec<Option<Planned>> {
        let mut records: Vec<_> = self.disks.iter().map(|s| s.record.clone()).collect();
        let mut next_ancestor = self.ancestors.len();
        opened
            .into_iter()
            .map(|ck| {
                let ck = ck?;
                let disk_map = ck
                    .disks
                    .iter()
                    .map(|s| match records.iter().position(|r| *r == s.record) {
                        Some(j) => j,
                        None => {
                            records.push(s.record.clone());
                            records.len() - 1
                        }
                    })
                    .collect();
                let ancestor_base = next_ancestor;
                next_ancestor += 1 + ck.ancestors.len();
                Some(Planned {
                    ck,
                    disk_map,
                    ancestor_base,
                })
            })
            .collect()
    }

    fn resolve_all(&mut self, planned: &[Option<Planned>]) {
        let mut words = vec![0u64; self.page_count() as usize];
        for (page, w) in words.iter_mut().enumerate() {
            let Ok((Location::Parent(p), _)) = self.stored_entry(PageIndex(page as u64)) else {
                continue;
            };
            *w = match planned.get(usize::from(p.0)) {
                None => invalid(0),
                Some(None) => invalid(2),
                Some(Some(plan)) => plan.resolve(page as u64),
            };
        }
        self.resolved = Resolved { words };
    }

    /// Take the parents apart: their files become ancestors, their disks not
    /// already open here are added in the order [`Checkpoint::plan`] gave them.
    fn adopt(&mut self, planned: Vec<Option<Planned>>) {
        for plan in planned.into_iter().flatten() {
            let mut ck = plan.ck;
            for (slot, &j) in std::mem::take(&mut ck.disks)
                .into_iter()
                .zip(&plan.disk_map)
            {
                if j == self.disks.len() {
                    self.disks.push(slot);
                }
            }
            self.missing.append(&mut ck.missing);
            let ancestors = std::mem::take(&mut ck.ancestors);
            self.ancestors.push(Ancestor {
                path: ck.path,
                file: ck.file,
                header: ck.header,
                mode: ck.mode,
                head: ck.head,
                table: ck.table,
                file_len: ck.file_len,
                parent_records: ck.parent_records,
            });
            self.ancestors.extend(ancestors);
        }
    }
}
