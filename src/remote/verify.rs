//! `ckptfs inspect s3://...` and `ckptfs verify s3://...`.

use super::fetch::Class;
use super::reader::RemoteCheckpoint;
use crate::checkpoint::error_chain;
use crate::format::Location;
use crate::source::PageReader;
use crate::types::{PAGE_SIZE, PAGE_SIZE_U64, PageIndex};
use crate::verify::{BadPage, MAX_LISTED, VerifyReport};

/// Pages per read while verifying (1 MiB).
const CHUNK_PAGES: u64 = 256;

/// What a pushed checkpoint holds.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RemoteInspection {
    /// The manifest object.
    pub manifest: String,
    /// Guest RAM bytes.
    pub guest_bytes: u64,
    /// Guest pages.
    pub pages: u64,
    /// ZERO pages.
    pub zero_pages: u64,
    /// DISK pages.
    pub disk_pages: u64,
    /// Stored pages (BLOB entries).
    pub blob_pages: u64,
    /// Distinct stored pages.
    pub blobs_stored: u64,
    /// Pack objects.
    pub packs: u64,
    /// Bytes in packs.
    pub pack_bytes: u64,
    /// Loading-set pages, if one was pushed.
    pub loading_set_pages: Option<u64>,
    /// Packs holding the loading set.
    pub loading_set_packs: u64,
    /// VMM-state bytes.
    pub vmm_state_bytes: u64,
    /// Disk images: recorded path and, if unusable here, why.
    pub disks: Vec<(String, Option<String>)>,
}

/// Summarize `rc` (no pack is fetched).
pub fn inspect(rc: &RemoteCheckpoint) -> RemoteInspection {
    let m = rc.manifest();
    let mut i = RemoteInspection {
        manifest: rc.object().to_owned(),
        guest_bytes: rc.guest_size(),
        pages: rc.page_count(),
        blobs_stored: m.blobs.len() as u64,
        packs: m.packs.len() as u64,
        pack_bytes: m.packs.iter().map(|p| p.len()).sum(),
        loading_set_pages: rc
            .loading_set()
            .map(|r| r.iter().map(|r| u64::from(r.pages)).sum()),
        loading_set_packs: u64::from(m.loadset_packs),
        vmm_state_bytes: m.state.len() as u64,
        ..RemoteInspection::default()
    };
    for p in 0..rc.page_count() {
        match crate::format::decode_entry(raw(rc, p), p).map(|e| e.0) {
            Ok(Location::Zero) => i.zero_pages += 1,
            Ok(Location::Disk(..)) => i.disk_pages += 1,
            Ok(Location::Blob(_)) => i.blob_pages += 1,
            _ => {}
        }
    }
    i.disks = rc
        .disk_records()
        .iter()
        .map(|d| {
            let why = rc
                .missing()
                .iter()
                .find(|(p, _)| *p == d.path)
                .map(|(_, w)| w.clone());
            (d.path.display().to_string(), why)
        })
        .collect();
    i
}

fn raw(rc: &RemoteCheckpoint, p: u64) -> &[u8] {
    let at = rc.header().table_offset as usize + p as usize * crate::format::ENTRY_LEN;
    &rc.manifest().front[at..at + crate::format::ENTRY_LEN]
}

/// Rebuild every page of `rc` (every pack fetched in parallel first), check
/// its CRC and, given `dump`, compare byte for byte.
pub fn verify(
    rc: &RemoteCheckpoint,
    dump: Option<&[u8]>,
    mut progress: impl FnMut(u64),
) -> VerifyReport {
    let pages = rc.page_count();
    let mut report = VerifyReport {
        pages,
        compared_with_dump: dump.is_some(),
        ..VerifyReport::default()
    };
    let record = |report: &mut VerifyReport, page: u64, problem: String| {
        report.bad_pages += 1;
        if report.first_bad.len() < MAX_LISTED {
            report.first_bad.push(BadPage { page, problem });
        }
    };
    if let Some(d) = dump
        && d.len() as u64 != rc.guest_size()
    {
        let what = format!(
            "dump is {} bytes, guest memory is {}",
            d.len(),
            rc.guest_size()
        );
        record(&mut report, 0, what);
        return report;
    }
    rc.prefetch_all(Class::LoadingSet);
    let mut buf = vec![0u8; CHUNK_PAGES as usize * PAGE_SIZE];
    let mut first = 0;
    while first < pages {
        let n = CHUNK_PAGES.min(pages - first);
        let out = &mut buf[..n as usize * PAGE_SIZE];
        let mut bad = Vec::new();
        if rc.read_pages(PageIndex(first), out).is_err() {
            for p in first..first + n {
                let page = &mut out[(p - first) as usize * PAGE_SIZE..][..PAGE_SIZE];
                if let Err(e) = rc.read_pages(PageIndex(p), page) {
                    record(&mut report, p, error_chain(&e));
                    bad.push(p);
                }
            }
        }
        if let Some(d) = dump {
            let want = &d[(first * PAGE_SIZE_U64) as usize..][..out.len()];
            for (k, (g, w)) in out
                .chunks_exact(PAGE_SIZE)
                .zip(want.chunks_exact(PAGE_SIZE))
                .enumerate()
            {
                let p = first + k as u64;
                if g != w && !bad.contains(&p) {
                    record(
                        &mut report,
                        p,
                        "rebuilt bytes differ from the memory dump".into(),
                    );
                }
            }
        }
        first += n;
        progress(first);
    }
    report
}
