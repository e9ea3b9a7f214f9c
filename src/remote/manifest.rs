//! The manifest: the one small object that makes a pushed checkpoint complete.
//!
//! A push writes every pack first and the manifest last, so a manifest names
//! only packs that exist: an interrupted push leaves no manifest and nothing a
//! mount would take for a checkpoint. It holds everything of the checkpoint
//! but its stored pages, so a mount opens with one GET:
//!
//! ```text
//!  0    +---------------------+
//!       | header (128)        |  magic, version, the checkpoint file's length and
//!       |                     |  xxh3-128, section counts, body CRC, header CRC
//!  128  +---------------------+
//!       | front               |  the checkpoint's bytes [0, blob offset): its header,
//!       |                     |  disk table, parent table (empty), page table, padding
//!       +---------------------+
//!       | VMM state           |  the checkpoint's VMM-state section
//!       +---------------------+
//!       | packs (20 x P)      |  u32 pages, [u8; 16] xxh3-128 of the pack (its name)
//!       +---------------------+
//!       | blob map (8 x B)    |  per blob: u32 pack, u32 page inside the pack
//!       +---------------------+
//!       | loading-set runs    |  20 x R, as in `ckptfs::loadset` (first-touch order)
//!       +---------------------+
//! ```
//!
//! The first `loadset_packs` packs hold the loading set's stored pages, in
//! first-touch order: a mount fetches them first, as whole objects in
//! parallel. Every page still carries its CRC in the page table, so a damaged
//! or swapped pack can never produce wrong bytes.

use crate::format::{self, DiskRecord, FormatError, Header, get_u32, get_u64};
use crate::loadset::{self, RUN_LEN, Run};
use crate::types::PAGE_SIZE_U64;

/// First eight bytes of a manifest.
pub const MAGIC: [u8; 8] = *b"CKPTRM\r\n";
/// Version this code writes and reads.
pub const VERSION: u32 = 1;
/// Length of the manifest header.
pub const HEADER_LEN: usize = 128;
/// Largest manifest accepted: a 64 GiB guest's page table is 192 MiB.
pub const MAX_MANIFEST_LEN: u64 = 1 << 30;
/// Where packs live in the bucket: shared by every checkpoint pushed there,
/// so pages two checkpoints share are uploaded once.
pub const PACK_ROOT: &str = "ckptfs-packs";
/// Name of the manifest object under the checkpoint's prefix.
pub const MANIFEST_NAME: &str = "ckptfs-manifest";

const VERSION_OFFSET: usize = MAGIC.len();
const FLAGS_OFFSET: usize = VERSION_OFFSET + 4;
const FILE_LEN_OFFSET: usize = FLAGS_OFFSET + 4;
const FILE_HASH_OFFSET: usize = FILE_LEN_OFFSET + 8;
const FRONT_LEN_OFFSET: usize = FILE_HASH_OFFSET + 16;
const STATE_LEN_OFFSET: usize = FRONT_LEN_OFFSET + 8;
const PACK_COUNT_OFFSET: usize = STATE_LEN_OFFSET + 8;
const BLOB_COUNT_OFFSET: usize = PACK_COUNT_OFFSET + 8;
const RUN_COUNT_OFFSET: usize = BLOB_COUNT_OFFSET + 8;
const LS_DATA_PAGES_OFFSET: usize = RUN_COUNT_OFFSET + 8;
const LS_WINDOW_OFFSET: usize = LS_DATA_PAGES_OFFSET + 8;
const LS_PACKS_OFFSET: usize = LS_WINDOW_OFFSET + 4;
const LS_PRESENT_OFFSET: usize = LS_PACKS_OFFSET + 4;
const BODY_CRC_OFFSET: usize = LS_PRESENT_OFFSET + 4;
const HEADER_CRC_OFFSET: usize = HEADER_LEN - 4;
/// One pack-table entry: `u32` pages and a 16-byte hash.
pub const PACK_LEN: usize = 4 + 16;
/// One blob-map entry: `u32` pack, `u32` page inside it.
pub const SLOT_LEN: usize = 8;

/// A pack object: up to a few MiB of stored pages, named by its content.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackRecord {
    /// Pages it holds.
    pub pages: u32,
    /// xxh3-128 of its bytes.
    pub hash: u128,
}

impl PackRecord {
    /// Its object key in the bucket.
    pub fn key(&self) -> String {
        pack_key(self.hash)
    }

    /// Its length in bytes.
    pub fn len(&self) -> u64 {
        u64::from(self.pages) * PAGE_SIZE_U64
    }

    /// Whether it holds no page (never written).
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }
}

/// The key of the pack whose bytes hash to `hash`.
pub fn pack_key(hash: u128) -> String {
    format!("{PACK_ROOT}/{hash:032x}")
}

/// Where a stored page (a blob) is: which pack, which page inside it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    /// Index in [`Manifest::packs`].
    pub pack: u32,
    /// Page inside the pack.
    pub index: u32,
}

/// The loading set as pushed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadingSetRecord {
    /// Recording window, ms.
    pub window_ms: u32,
    /// Runs in first-touch order.
    pub runs: Vec<Run>,
}

/// A decoded manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// Length of the checkpoint file.
    pub file_len: u64,
    /// xxh3-128 of the whole checkpoint file (a pull rebuilds exactly it).
    pub file_hash: u128,
    /// Checkpoint bytes `[0, blob offset)`.
    pub front: Vec<u8>,
    /// The VMM-state section.
    pub state: Vec<u8>,
    /// Pack objects, the loading set's first.
    pub packs: Vec<PackRecord>,
    /// Where each blob is.
    pub blobs: Vec<Slot>,
    /// The loading set, if one was pushed.
    pub loading_set: Option<LoadingSetRecord>,
    /// How many leading packs hold the loading set's pages.
    pub loadset_packs: u32,
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn get_u128(b: &[u8], at: usize) -> u128 {
    u128::from_le_bytes(b[at..at + 16].try_into().expect("16 bytes"))
}

/// A manifest, checked: its decoded checkpoint header and disk table.
#[derive(Clone, Debug)]
pub struct Checked {
    /// The manifest.
    pub manifest: Manifest,
    /// The checkpoint's header (from the front).
    pub header: Header,
    /// The checkpoint's disk table.
    pub disks: Vec<DiskRecord>,
}

impl Manifest {
    /// Serialize.
    pub fn encode(&self) -> Vec<u8> {
        let runs = self.loading_set.as_ref().map(|l| l.runs.as_slice());
        let runs = loadset::encode_runs(runs.unwrap_or(&[]));
        let mut body = Vec::with_capacity(
            self.front.len()
                + self.state.len()
                + self.packs.len() * PACK_LEN
                + self.blobs.len() * SLOT_LEN
                + runs.len(),
        );
        body.extend_from_slice(&self.front);
        body.extend_from_slice(&self.state);
        for p in &self.packs {
            body.extend_from_slice(&p.pages.to_le_bytes());
            body.extend_from_slice(&p.hash.to_le_bytes());
        }
        for s in &self.blobs {
            body.extend_from_slice(&s.pack.to_le_bytes());
            body.extend_from_slice(&s.index.to_le_bytes());
        }
        body.extend_from_slice(&runs);
        let ls = self.loading_set.as_ref();
        let ls_data: u64 = ls.map_or(0, |l| {
            l.runs
                .iter()
                .filter(|r| !r.zero)
                .map(|r| u64::from(r.pages))
                .sum()
        });
        let mut h = [0u8; HEADER_LEN];
        h[..MAGIC.len()].copy_from_slice(&MAGIC);
        put_u32(&mut h, VERSION_OFFSET, VERSION);
        put_u64(&mut h, FILE_LEN_OFFSET, self.file_len);
        h[FILE_HASH_OFFSET..FILE_HASH_OFFSET + 16].copy_from_slice(&self.file_hash.to_le_bytes());
        put_u64(&mut h, FRONT_LEN_OFFSET, self.front.len() as u64);
        put_u64(&mut h, STATE_LEN_OFFSET, self.state.len() as u64);
        put_u64(&mut h, PACK_COUNT_OFFSET, self.packs.len() as u64);
        put_u64(&mut h, BLOB_COUNT_OFFSET, self.blobs.len() as u64);
        put_u64(&mut h, RUN_COUNT_OFFSET, (runs.len() / RUN_LEN) as u64);
        put_u64(&mut h, LS_DATA_PAGES_OFFSET, ls_data);
        put_u32(&mut h, LS_WINDOW_OFFSET, ls.map_or(0, |l| l.window_ms));
        put_u32(&mut h, LS_PACKS_OFFSET, self.loadset_packs);
        put_u32(&mut h, LS_PRESENT_OFFSET, u32::from(ls.is_some()));
        put_u32(&mut h, BODY_CRC_OFFSET, crc32fast::hash(&body));
        let crc = crc32fast::hash(&h[..HEADER_CRC_OFFSET]);
        put_u32(&mut h, HEADER_CRC_OFFSET, crc);
        let mut out = h.to_vec();
        out.extend_from_slice(&body);
        out
    }

    /// Parse and check a manifest: its header, body CRC and layout, then the
    /// checkpoint header, tables and state it carries (as a checkpoint file's
    /// open checks them), then every slot and run against the packs and the
    /// guest. Never panics on bad bytes.
    pub fn decode(b: &[u8]) -> Result<Checked, String> {
        if b.len() < HEADER_LEN {
            return Err(format!("{} bytes, shorter than its header", b.len()));
        }
        if b[..MAGIC.len()] != MAGIC {
            return Err("not a ckptfs manifest (bad magic)".into());
        }
        let version = get_u32(b, VERSION_OFFSET);
        if version != VERSION {
            return Err(format!(
                "manifest version {version} is not supported (this build reads {VERSION})"
            ));
        }
        if crc32fast::hash(&b[..HEADER_CRC_OFFSET]) != get_u32(b, HEADER_CRC_OFFSET) {
            return Err("header checksum mismatch".into());
        }
        if get_u32(b, FLAGS_OFFSET) != 0 || get_u32(b, LS_PRESENT_OFFSET) > 1 {
            return Err("unknown flags set".into());
        }
        let n = |at| get_u64(b, at);
        let lens = [
            n(FRONT_LEN_OFFSET),
            n(STATE_LEN_OFFSET),
            n(PACK_COUNT_OFFSET).saturating_mul(PACK_LEN as u64),
            n(BLOB_COUNT_OFFSET).saturating_mul(SLOT_LEN as u64),
            n(RUN_COUNT_OFFSET).saturating_mul(RUN_LEN as u64),
        ];
        let total = lens
            .iter()
            .try_fold(HEADER_LEN as u64, |a, &l| a.checked_add(l));
        if total != Some(b.len() as u64) {
            return Err("section lengths do not add up to the object's length (truncated?)".into());
        }
        let body = &b[HEADER_LEN..];
        if crc32fast::hash(body) != get_u32(b, BODY_CRC_OFFSET) {
            return Err("body checksum mismatch (corrupted)".into());
        }
        let mut at = 0usize;
        let mut take = |len: u64| {
            let s = &body[at..at + len as usize];
            at += len as usize;
            s
        };
        let front = take(lens[0]).to_vec();
        let state = take(lens[1]).to_vec();
        let packs: Vec<PackRecord> = take(lens[2])
            .chunks_exact(PACK_LEN)
            .map(|e| PackRecord {
                pages: get_u32(e, 0),
                hash: get_u128(e, 4),
            })
            .collect();
        let blobs: Vec<Slot> = take(lens[3])
            .chunks_exact(SLOT_LEN)
            .map(|e| Slot {
                pack: get_u32(e, 0),
                index: get_u32(e, 4),
            })
            .collect();
        let run_bytes = take(lens[4]);
        let manifest = Manifest {
            file_len: n(FILE_LEN_OFFSET),
            file_hash: get_u128(b, FILE_HASH_OFFSET),
            front,
            state,
            packs,
            blobs,
            loading_set: None,
            loadset_packs: get_u32(b, LS_PACKS_OFFSET),
        };
        let (header, disks) = manifest.check_checkpoint().map_err(|e| e.to_string())?;
        manifest.check_slots()?;
        let mut manifest = manifest;
        if get_u32(b, LS_PRESENT_OFFSET) == 1 {
            let runs = loadset::decode_runs(run_bytes, header.page_count, n(LS_DATA_PAGES_OFFSET))
                .map_err(|e| format!("loading set: {e}"))?;
            manifest.loading_set = Some(LoadingSetRecord {
                window_ms: get_u32(b, LS_WINDOW_OFFSET),
                runs,
            });
        } else if !run_bytes.is_empty() {
            return Err("loading-set runs without a loading set".into());
        }
        Ok(Checked {
            manifest,
            header,
            disks,
        })
    }

    /// The checkpoint header, tables and state, checked as an open would.
    fn check_checkpoint(&self) -> Result<(Header, Vec<DiskRecord>), FormatError> {
        let h = Header::decode(&self.front, self.file_len)?;
        if h.blobs_offset != self.front.len() as u64
            || h.state_len != self.state.len() as u64
            || h.blob_count != self.blobs.len() as u64
            || h.file_len() != self.file_len
        {
            return Err(FormatError::BadLayout(
                "the manifest's sections do not match the checkpoint header",
            ));
        }
        let section = |s: format::Section| &self.front[s.offset as usize..s.end() as usize];
        for (name, s, crc) in [
            ("disk table", h.disks(), h.disks_crc),
            ("parent table", h.parents(), h.parents_crc),
            ("page table", h.table(), h.table_crc),
        ] {
            if crc32fast::hash(section(s)) != crc {
                return Err(FormatError::SectionCrc(name));
            }
        }
        if crc32fast::hash(&self.state) != h.state_crc {
            return Err(FormatError::SectionCrc("VMM state"));
        }
        if !format::decode_parents(section(h.parents()))?.is_empty() {
            return Err(FormatError::BadParentTable(
                "a pushed checkpoint stands alone (its parents' pages are in its packs)",
            ));
        }
        let gap = &self.front[h.table().end() as usize..];
        if gap.iter().any(|&b| b != 0) {
            return Err(FormatError::BadLayout(
                "padding between sections is not up to a page of zeros",
            ));
        }
        let disks = format::decode_disks(section(h.disks()))?;
        Ok((h, disks))
    }

    fn check_slots(&self) -> Result<(), String> {
        if self.loadset_packs as usize > self.packs.len() {
            return Err("more loading-set packs than packs".into());
        }
        if let Some(p) = self.packs.iter().position(|p| p.pages == 0) {
            return Err(format!("pack {p} is empty"));
        }
        for (b, s) in self.blobs.iter().enumerate() {
            let ok = self
                .packs
                .get(s.pack as usize)
                .is_some_and(|p| s.index < p.pages);
            if !ok {
                return Err(format!("blob {b} points outside its pack"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{CheckpointWriter, Location, zero_page_crc};
    use crate::types::BlobIndex;

    /// A two-page checkpoint (one zero page, one blob) as a manifest.
    pub(crate) fn sample() -> Manifest {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c");
        let mut f = std::fs::File::create(&path).unwrap();
        let mut w = CheckpointWriter::new(&mut f, 2, &[], &[]).unwrap();
        let page = [9u8; 4096];
        w.push(Location::Zero, zero_page_crc());
        let b = w.push_blob(&page).unwrap();
        assert_eq!(b, BlobIndex(0));
        w.push(Location::Blob(b), crc32fast::hash(&page));
        let h = w.finish(b"st").unwrap();
        drop(f);
        let bytes = std::fs::read(&path).unwrap();
        Manifest {
            file_len: bytes.len() as u64,
            file_hash: xxhash_rust::xxh3::xxh3_128(&bytes),
            front: bytes[..h.blobs_offset as usize].to_vec(),
            state: b"st".to_vec(),
            packs: vec![PackRecord {
                pages: 1,
                hash: 0xfeed,
            }],
            blobs: vec![Slot { pack: 0, index: 0 }],
            loading_set: Some(LoadingSetRecord {
                window_ms: 100,
                runs: vec![Run {
                    first_page: 1,
                    pages: 1,
                    t_ms: 0,
                    zero: false,
                }],
            }),
            loadset_packs: 1,
        }
    }

    #[test]
    fn manifest_round_trips() {
        let m = sample();
        let c = Manifest::decode(&m.encode()).unwrap();
        assert_eq!(c.manifest, m);
        assert_eq!(c.header.page_count, 2);
        assert!(c.disks.is_empty());
        assert_eq!(m.packs[0].key(), format!("{PACK_ROOT}/{:032x}", 0xfeed));
    }

    #[test]
    fn golden_header_fields() {
        let b = sample().encode();
        assert_eq!(&b[..8], b"CKPTRM\r\n"); // magic
        assert_eq!(&b[8..12], &[1, 0, 0, 0]); // version 1
        assert_eq!(&b[12..16], &[0; 4]); // flags
        assert_eq!(get_u64(&b, 56), 1); // one pack
        assert_eq!(get_u64(&b, 64), 1); // one blob
        assert_eq!(get_u64(&b, 72), 1); // one run
        assert_eq!(get_u32(&b, 92), 1); // one loading-set pack
        assert_eq!(get_u32(&b, 96), 1); // a loading set is present
        assert_eq!(get_u32(&b, 124), crc32fast::hash(&b[..124])); // header CRC
    }

    #[test]
    fn damaged_or_truncated_manifests_are_refused() {
        let good = sample().encode();
        assert!(Manifest::decode(&good[..good.len() - 1]).is_err());
        assert!(Manifest::decode(&good[..100]).is_err());
        for at in [0, 20, HEADER_LEN + 3, good.len() - 5] {
            let mut bad = good.clone();
            bad[at] ^= 1;
            assert!(Manifest::decode(&bad).is_err(), "flip at {at}");
        }
        let mut m = sample();
        m.blobs[0].index = 1;
        assert_eq!(
            Manifest::decode(&m.encode()).unwrap_err(),
            "blob 0 points outside its pack"
        );
    }
}
