//! The state belongs to one memory: a state section names the guest RAM it was saved with.
//!
//! The state is stored inside the checkpoint, so it cannot hold the checkpoint's hash.
//! Instead it records the CRC32 of a few small pages that identify this VM at this moment:
//!
//! - the page tables (PML4, PDPT, the four page directories): the same in every vmm-lite
//!   guest, so they catch memory that is not a vmm-lite guest's at all;
//! - the boot info page: RAM and disk size, workload, seed, desktop parameters;
//! - the guest stack, from the saved `rsp` to the top (at most [`MAX_STACK_PAGES`]): it holds
//!   the workload state with its PRNG and request counter, which differ between VMs and
//!   between two moments of one VM.
//!
//! A restore checks them against guest RAM before the vCPU runs (a few page faults, most of
//! which the guest would take anyway) and refuses a state that does not match, instead of
//! resuming a VM whose registers and memory disagree.

use crate::abi;
use crate::memory::GuestMemory;

/// Most stack pages recorded (the guest's stack is a few pages deep when it pauses).
pub const MAX_STACK_PAGES: u64 = 16;

/// The CRC32 of one guest page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PageCrc {
    /// Guest page index.
    pub page: u64,
    /// CRC32 (IEEE) of its 4096 bytes.
    pub crc32: u32,
}

/// Why guest RAM does not belong to a state.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BindingError {
    /// A recorded page differs.
    #[error("guest page {page:#x} ({what}) differs from the one the state was saved with")]
    Differs {
        /// Guest page index.
        page: u64,
        /// What the page holds.
        what: &'static str,
    },
    /// The state does not record the pages its own registers call for.
    #[error("the state's memory binding does not list the expected pages")]
    Malformed,
}

/// The pages that identify a VM paused with stack pointer `rsp`.
pub fn binding_pages(rsp: u64) -> Vec<u64> {
    let page = |addr: u64| addr / abi::PAGE_SIZE;
    let top = page(abi::STACK_TOP);
    let lowest = page(rsp).clamp(top - MAX_STACK_PAGES, top - 1);
    let tables = page(abi::PML4_ADDR)..page(abi::PD_ADDR) + abi::PD_LOW_COUNT;
    tables
        .chain([page(abi::BOOT_INFO_ADDR)])
        .chain(lowest..top)
        .collect()
}

fn what(page: u64) -> &'static str {
    let addr = page * abi::PAGE_SIZE;
    if addr == abi::BOOT_INFO_ADDR {
        "boot info"
    } else if addr < abi::BOOT_INFO_ADDR {
        "page table"
    } else {
        "guest stack"
    }
}

fn page_crc(mem: &GuestMemory, page: u64) -> Option<u32> {
    let bytes = mem.range(page * abi::PAGE_SIZE, abi::PAGE_SIZE)?;
    Some(crc32fast::hash(bytes))
}

/// Records the identifying pages of a VM paused with stack pointer `rsp`.
pub fn record(mem: &GuestMemory, rsp: u64) -> Vec<PageCrc> {
    binding_pages(rsp)
        .into_iter()
        .map(|page| PageCrc {
            page,
            crc32: page_crc(mem, page).expect("identifying pages lie below MIN_MEM"),
        })
        .collect()
}

/// Checks that `mem` holds the pages `binding` recorded for a VM paused at `rsp`.
pub fn verify(mem: &GuestMemory, rsp: u64, binding: &[PageCrc]) -> Result<(), BindingError> {
    let expected = binding_pages(rsp);
    if binding.len() != expected.len() || binding.iter().zip(&expected).any(|(b, &p)| b.page != p) {
        return Err(BindingError::Malformed);
    }
    for b in binding {
        if page_crc(mem, b.page) != Some(b.crc32) {
            return Err(BindingError::Differs {
                page: b.page,
                what: what(b.page),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const RSP: u64 = abi::STACK_TOP - 0x1100;

    #[test]
    fn pages_are_tables_boot_info_and_the_used_stack() {
        let pages = binding_pages(RSP);
        assert_eq!(pages, vec![1, 2, 3, 4, 5, 6, 7, 0x1fe, 0x1ff]);
        assert_eq!(binding_pages(0).len(), 7 + MAX_STACK_PAGES as usize);
        assert_eq!(binding_pages(u64::MAX).last(), Some(&0x1ff));
    }

    #[test]
    fn the_recorded_memory_matches_and_a_changed_page_is_named() {
        let mut mem = GuestMemory::anonymous(abi::MIN_MEM).unwrap();
        mem.write(abi::STACK_TOP - 8, &[1]).unwrap();
        let binding = record(&mem, RSP);
        assert_eq!(verify(&mem, RSP, &binding), Ok(()));
        mem.write(abi::STACK_TOP - 8, &[2]).unwrap();
        assert_eq!(
            verify(&mem, RSP, &binding),
            Err(BindingError::Differs {
                page: 0x1ff,
                what: "guest stack"
            })
        );
        mem.write(abi::STACK_TOP - 8, &[1]).unwrap();
        mem.write(abi::BOOT_INFO_ADDR + 8, &[5]).unwrap();
        let err = verify(&mem, RSP, &binding).unwrap_err();
        assert_eq!(
            err.to_string(),
            "guest page 0x7 (boot info) differs from the one the state was saved with"
        );
    }

    #[test]
    fn a_binding_for_other_pages_is_malformed() {
        let mem = GuestMemory::anonymous(abi::MIN_MEM).unwrap();
        let binding = record(&mem, RSP);
        assert_eq!(
            verify(&mem, RSP - 0x1000, &binding),
            Err(BindingError::Malformed)
        );
        assert_eq!(
            verify(&mem, RSP, &binding[1..]),
            Err(BindingError::Malformed)
        );
    }
}
