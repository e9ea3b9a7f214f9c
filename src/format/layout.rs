//! Section placement and the streaming writer: the only code that decides
//! where a byte of a checkpoint goes.
//!
//! The page table's length is known before the first page is classified (12
//! bytes a page), so the blob section's offset is too: blobs stream out as they
//! are found, the VMM state follows the last one, and the header, the tables
//! and the page table are written last at the front of the file.

use std::fs::File;
use std::io::{self, BufWriter, Seek, SeekFrom, Write};

use super::entry::{ENTRY_LEN, Location, MAX_BLOBS, encode_entry};
use super::tables::{DiskRecord, ParentRecord, encode_disks, encode_parents};
use super::{HEADER_LEN, Header, MAX_STATE_LEN, page_align};
use crate::types::{BlobIndex, PAGE_SIZE, PAGE_SIZE_U64};

/// Where the sections of a checkpoint go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    header: Header,
}

impl Layout {
    /// Place the header, the disk table, the parent table and the page table of
    /// a checkpoint of `page_count` pages, back to back; the blob section starts
    /// at the next multiple of 4096 (so blobs can be read with O_DIRECT).
    pub fn new(page_count: u64, disks_len: u64, parents_len: u64) -> Layout {
        let mut h = Header {
            guest_size: page_count * PAGE_SIZE_U64,
            page_count,
            disks_offset: HEADER_LEN as u64,
            disks_len,
            ..Header::default()
        };
        h.parents_offset = h.disks_offset + disks_len;
        h.parents_len = parents_len;
        h.table_offset = h.parents_offset + parents_len;
        h.table_len = page_count * ENTRY_LEN as u64;
        h.blobs_offset = page_align(h.table_offset + h.table_len);
        Layout { header: h }
    }

    /// Offset of the first blob.
    pub fn blobs_offset(&self) -> u64 {
        self.header.blobs_offset
    }

    /// The header once `blob_count` blobs are written and `state_len` bytes of
    /// VMM state follow them (CRCs still 0).
    pub fn finish(&self, blob_count: u64, state_len: u64) -> Header {
        let mut h = self.header;
        h.blob_count = blob_count;
        h.state_offset = h.blobs_offset + blob_count * PAGE_SIZE_U64;
        h.state_len = state_len;
        h
    }
}

/// Streams a checkpoint into a file: pages in order, blobs as they come.
pub struct CheckpointWriter<'f> {
    out: BufWriter<&'f mut File>,
    layout: Layout,
    disks: Vec<u8>,
    parents: Vec<u8>,
    table: Vec<u8>,
    blob_count: u64,
}

impl std::fmt::Debug for CheckpointWriter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointWriter")
            .field("layout", &self.layout)
            .field("pages", &(self.table.len() / ENTRY_LEN))
            .field("blob_count", &self.blob_count)
            .finish()
    }
}

fn invalid(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what)
}

impl<'f> CheckpointWriter<'f> {
    /// Start a checkpoint of `page_count` pages referencing `disks` and
    /// `parents` in `file` (empty, opened for writing).
    pub fn new(
        file: &'f mut File,
        page_count: u64,
        disks: &[DiskRecord],
        parents: &[ParentRecord],
    ) -> io::Result<Self> {
        let disks = encode_disks(disks);
        let parents = encode_parents(parents);
        let layout = Layout::new(page_count, disks.len() as u64, parents.len() as u64);
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.seek(SeekFrom::Start(layout.blobs_offset()))?;
        Ok(CheckpointWriter {
            out,
            layout,
            disks,
            parents,
            table: Vec::with_capacity(page_count as usize * ENTRY_LEN),
            blob_count: 0,
        })
    }

    /// Append the next page's entry.
    ///
    /// # Panics
    /// If `loc` cannot be encoded (see [`Location::is_encodable`]).
    pub fn push(&mut self, loc: Location, crc: u32) {
        self.table.extend_from_slice(&encode_entry(loc, crc));
    }

    /// Store `page` (4096 bytes) as the next blob.
    pub fn push_blob(&mut self, page: &[u8]) -> io::Result<BlobIndex> {
        if page.len() != PAGE_SIZE {
            return Err(invalid("a blob is one 4096-byte page"));
        }
        if self.blob_count >= MAX_BLOBS {
            return Err(invalid("too many blobs for the format"));
        }
        self.out.write_all(page)?;
        self.blob_count += 1;
        Ok(BlobIndex(self.blob_count - 1))
    }

    /// Pages pushed so far.
    pub fn pages(&self) -> u64 {
        (self.table.len() / ENTRY_LEN) as u64
    }

    /// Write the VMM state, the header and the tables, and give the file its
    /// full length. Returns the header written; the caller fsyncs.
    pub fn finish(mut self, state: &[u8]) -> io::Result<Header> {
        if self.pages() != self.layout.header.page_count {
            return Err(invalid("fewer pages pushed than the checkpoint holds"));
        }
        if state.len() as u64 > MAX_STATE_LEN {
            return Err(invalid("VMM state larger than the format's limit"));
        }
        let mut h = self.layout.finish(self.blob_count, state.len() as u64);
        h.disks_crc = crc32fast::hash(&self.disks);
        h.parents_crc = crc32fast::hash(&self.parents);
        h.table_crc = crc32fast::hash(&self.table);
        h.state_crc = crc32fast::hash(state);
        self.out.write_all(state)?;
        self.out.seek(SeekFrom::Start(0))?;
        self.out.write_all(&h.encode())?;
        self.out.write_all(&self.disks)?;
        self.out.write_all(&self.parents)?;
        self.out.write_all(&self.table)?;
        let file = self.out.into_inner().map_err(|e| e.into_error())?;
        // Sections may end before the blob offset (no blobs, no state): give the
        // file its full length so every section lies inside it.
        file.set_len(h.file_len())?;
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{decode_entry, zero_page_crc};
    use crate::types::{DiskIndex, DiskOffset, ParentIndex};

    #[test]
    fn layout_places_sections_back_to_back_with_aligned_blobs() {
        let l = Layout::new(3, 10, 20);
        let h = l.finish(2, 5);
        assert_eq!(h.disks_offset, 256);
        assert_eq!(h.parents_offset, 266);
        assert_eq!(h.table_offset, 286);
        assert_eq!(h.table_len, 36);
        assert_eq!(h.blobs_offset, 4096);
        assert_eq!(h.state_offset, 4096 + 2 * 4096);
        assert_eq!(h.file_len(), 3 * 4096 + 5);
    }

    #[test]
    fn writer_output_decodes() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = File::create(dir.path().join("c")).unwrap();
        let mut w = CheckpointWriter::new(&mut f, 4, &[], &[]).unwrap();
        let page = [7u8; PAGE_SIZE];
        let crc = crc32fast::hash(&page);
        w.push(Location::Zero, zero_page_crc());
        let b = w.push_blob(&page).unwrap();
        w.push(Location::Blob(b), crc);
        w.push(Location::Disk(DiskIndex(0), DiskOffset(1536)), 1);
        w.push(Location::Parent(ParentIndex(0)), 2);
        let h = w.finish(b"state").unwrap();
        drop(f);
        let bytes = std::fs::read(dir.path().join("c")).unwrap();
        assert_eq!(bytes.len() as u64, h.file_len());
        assert_eq!(Header::decode(&bytes, bytes.len() as u64), Ok(h));
        let at = |p: usize| &bytes[h.table_offset as usize + p * ENTRY_LEN..];
        assert_eq!(
            decode_entry(at(2), 2),
            Ok((Location::Disk(DiskIndex(0), DiskOffset(1536)), 1))
        );
        let blob = h.blobs_offset as usize;
        assert_eq!(&bytes[blob..blob + PAGE_SIZE], &page);
        assert_eq!(&bytes[h.state_offset as usize..], b"state");
    }

    #[test]
    fn writer_refuses_a_short_table() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = File::create(dir.path().join("c")).unwrap();
        let w = CheckpointWriter::new(&mut f, 2, &[], &[]).unwrap();
        assert!(w.finish(b"").is_err());
    }
}
