//! The guest loader: the guest program image (built by build.rs from vmm-lite/guest) and the
//! memory and register setup that enters it directly in 64-bit long mode.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

use crate::abi;
use crate::memory::GuestMemory;

/// The flat guest image, loaded at [`abi::IMAGE_ADDR`]; its first byte is the entry point.
pub static IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest.bin"));

/// Which workload the guest sets up (passed in the boot info).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Reads much of the disk into memory; requests read cached pages.
    Pagecache,
    /// Fills memory with computed data; requests read it.
    Anon,
    /// Page cache, computed data and untouched memory together.
    Mixed,
    /// A virtual desktop: page cache, computed data and free memory interleaved; requests
    /// touch a working set of file-page runs and scattered heap pages, plus cold pages.
    Desktop,
}

impl Workload {
    fn code(self) -> u64 {
        match self {
            Workload::Pagecache => abi::WORKLOAD_PAGECACHE,
            Workload::Anon => abi::WORKLOAD_ANON,
            Workload::Mixed => abi::WORKLOAD_MIXED,
            Workload::Desktop => abi::WORKLOAD_DESKTOP,
        }
    }
}

/// Parameters of the desktop workload (README: "The desktop workload").
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DesktopParams {
    /// Page cache, percent of the heap (bounded by the disk size).
    pub cache_pct: u64,
    /// Computed data, percent of the heap.
    pub anon_pct: u64,
    /// Working set, percent of the heap.
    pub ws_pct: u64,
    /// Accesses to pages outside the working set, per mille.
    pub cold_permille: u64,
}

impl Default for DesktopParams {
    fn default() -> Self {
        DesktopParams {
            cache_pct: abi::DESKTOP_DEFAULT_CACHE_PCT,
            anon_pct: abi::DESKTOP_DEFAULT_ANON_PCT,
            ws_pct: abi::DESKTOP_DEFAULT_WS_PCT,
            cold_permille: abi::DESKTOP_DEFAULT_COLD_PERMILLE,
        }
    }
}

/// Desktop parameters outside their ranges.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DesktopParamsError {
    /// Page cache and computed data together exceed the heap.
    #[error("--desktop-cache-pct {cache} + --desktop-anon-pct {anon} exceed 100")]
    Used {
        /// Page cache percent.
        cache: u64,
        /// Computed data percent.
        anon: u64,
    },
    /// The working set is empty or larger than the heap.
    #[error("--desktop-ws-pct {0} is not in 1..=100")]
    WorkingSet(u64),
    /// More than all accesses are cold.
    #[error("--desktop-cold-permille {0} is not in 0..=1000")]
    Cold(u64),
}

impl DesktopParams {
    /// Checks the ranges the guest relies on.
    pub fn validate(&self) -> Result<(), DesktopParamsError> {
        if self.cache_pct.saturating_add(self.anon_pct) > 100 {
            return Err(DesktopParamsError::Used {
                cache: self.cache_pct,
                anon: self.anon_pct,
            });
        }
        if !(1..=100).contains(&self.ws_pct) {
            return Err(DesktopParamsError::WorkingSet(self.ws_pct));
        }
        if self.cold_permille > 1000 {
            return Err(DesktopParamsError::Cold(self.cold_permille));
        }
        Ok(())
    }
}

/// What the guest is told at boot.
#[derive(Clone, Copy, Debug)]
pub struct BootParams {
    /// Workload to set up.
    pub workload: Workload,
    /// Disk size in bytes.
    pub disk_size: u64,
    /// Seed of the guest's PRNG.
    pub seed: u64,
    /// Desktop parameters (written to the boot info whatever the workload; only the desktop
    /// workload reads them).
    pub desktop: DesktopParams,
}

// Page-table entry bits.
const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_HUGE: u64 = 1 << 7;

// Control-register and EFER bits.
const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const CODE_SELECTOR: u16 = 0x8;
const DATA_SELECTOR: u16 = 0x10;
/// Null, 64-bit code (type 0xb, L), flat data (type 0x3).
const GDT: [u64; 3] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];

/// Writes the GDT, page tables, boot info and image into fresh guest RAM.
pub fn load(mem: &mut GuestMemory, params: &BootParams) {
    assert!(
        IMAGE.len() as u64 <= abi::IMAGE_MAX,
        "guest image too large"
    );
    let gdt: Vec<u8> = GDT.iter().flat_map(|e| e.to_le_bytes()).collect();
    mem.write(abi::GDT_ADDR, &gdt).expect("GDT below MIN_MEM");
    write_page_tables(mem);
    let info = [
        abi::BOOT_MAGIC,
        mem.size(),
        params.disk_size,
        params.workload.code(),
        params.seed,
        abi::BOOT_INFO_SIZE,
        0, // session: none yet (a restore sets it)
        params.desktop.cache_pct,
        params.desktop.anon_pct,
        params.desktop.ws_pct,
        params.desktop.cold_permille,
    ];
    let info: Vec<u8> = info.iter().flat_map(|v| v.to_le_bytes()).collect();
    debug_assert_eq!(info.len() as u64, abi::BOOT_INFO_SIZE);
    mem.write(abi::BOOT_INFO_ADDR, &info)
        .expect("boot info below MIN_MEM");
    mem.write(abi::IMAGE_ADDR, IMAGE)
        .expect("image below MIN_MEM");
}

/// Sets the session's request seed in the boot info of a paused guest (see
/// [`abi::BOOT_SESSION_OFFSET`]); the guest reads it at every request.
pub fn set_session(mem: &mut GuestMemory, seed: u64) {
    mem.write(
        abi::BOOT_INFO_ADDR + abi::BOOT_SESSION_OFFSET,
        &seed.to_le_bytes(),
    )
    .expect("boot info below MIN_MEM");
}

/// Guest physical address of page directory `pd` (see [`abi::PD_HIGH_ADDR`]).
fn pd_addr(pd: u64) -> u64 {
    if pd < abi::PD_LOW_COUNT {
        abi::PD_ADDR + pd * abi::PAGE_SIZE
    } else {
        abi::PD_HIGH_ADDR + (pd - abi::PD_LOW_COUNT) * abi::PAGE_SIZE
    }
}

/// PML4[0] -> PDPT; PDPT[i] -> PD i; each PD maps 1 GiB with 2 MiB pages: identity map of
/// RAM (at least the first 4 GiB, as vmm-lite always did, so small guests' memory is
/// byte for byte what it was).
fn write_page_tables(mem: &mut GuestMemory) {
    let entry = |addr: u64| (addr | PTE_PRESENT | PTE_WRITABLE).to_le_bytes();
    mem.write(abi::PML4_ADDR, &entry(abi::PDPT_ADDR))
        .expect("in RAM");
    let pds = mem.size().div_ceil(1 << 30).max(abi::PD_LOW_COUNT);
    for pd in 0..pds {
        let pd_addr = pd_addr(pd);
        mem.write(abi::PDPT_ADDR + pd * 8, &entry(pd_addr))
            .expect("in RAM");
        let table: Vec<u8> = (0..512u64)
            .flat_map(|i| {
                let addr = (pd << 30) | (i << 21);
                (addr | PTE_PRESENT | PTE_WRITABLE | PTE_HUGE).to_le_bytes()
            })
            .collect();
        mem.write(pd_addr, &table).expect("in RAM");
    }
}

fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Long mode, paging on, SSE usable (OSFXSR/OSXMMEXCPT set, EM clear): the compiler may emit
/// SSE instructions in the guest.
pub fn boot_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    sregs.cs = segment(CODE_SELECTOR, 0xb, true);
    let data = segment(DATA_SELECTOR, 0x3, false);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.gdt.base = abi::GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.cr3 = abi::PML4_ADDR;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// Entry at the image start with `rdi` = boot info and a 16-byte aligned stack as after a call.
pub fn boot_regs() -> kvm_regs {
    kvm_regs {
        rip: abi::IMAGE_ADDR,
        rsp: abi::STACK_TOP - 8,
        rdi: abi::BOOT_INFO_ADDR,
        rflags: 0x2,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tables_identity_map_the_last_page_of_4_gib() {
        let mut mem = GuestMemory::anonymous(abi::MIN_MEM).unwrap();
        load(
            &mut mem,
            &BootParams {
                workload: Workload::Mixed,
                disk_size: 0,
                seed: 1,
                desktop: DesktopParams::default(),
            },
        );
        let addr: u64 = (4 << 30) - 4096;
        let pml4e = mem
            .read_u64(abi::PML4_ADDR + 8 * ((addr >> 39) & 511))
            .unwrap();
        let pdpte = mem
            .read_u64((pml4e & !0xfff) + 8 * ((addr >> 30) & 511))
            .unwrap();
        let pde = mem
            .read_u64((pdpte & !0xfff) + 8 * ((addr >> 21) & 511))
            .unwrap();
        assert_eq!(pde & PTE_HUGE, PTE_HUGE);
        assert_eq!((pde & !0x1f_ffff) | (addr & 0x1f_ffff), addr);
    }

    #[test]
    fn image_fits_and_boot_info_is_written() {
        assert!(!IMAGE.is_empty() && IMAGE.len() as u64 <= abi::IMAGE_MAX);
        let mut mem = GuestMemory::anonymous(abi::MIN_MEM).unwrap();
        load(
            &mut mem,
            &BootParams {
                workload: Workload::Anon,
                disk_size: 8192,
                seed: 7,
                desktop: DesktopParams::default(),
            },
        );
        assert_eq!(mem.read_u64(abi::BOOT_INFO_ADDR), Some(abi::BOOT_MAGIC));
        assert_eq!(
            mem.read_u64(abi::BOOT_INFO_ADDR + abi::BOOT_MEM_SIZE_OFFSET),
            Some(abi::MIN_MEM)
        );
        assert_eq!(
            mem.read_u64(abi::BOOT_INFO_ADDR + abi::BOOT_WORKLOAD_OFFSET),
            Some(abi::WORKLOAD_ANON)
        );
        assert_eq!(
            mem.range(abi::IMAGE_ADDR, IMAGE.len() as u64).unwrap(),
            IMAGE
        );
        assert_eq!(
            mem.read_u64(abi::BOOT_INFO_ADDR + abi::BOOT_SIZE_OFFSET),
            Some(abi::BOOT_INFO_SIZE)
        );
        assert_eq!(
            mem.read_u64(abi::BOOT_INFO_ADDR + abi::BOOT_DESKTOP_COLD_PERMILLE_OFFSET),
            Some(abi::DESKTOP_DEFAULT_COLD_PERMILLE)
        );
    }

    #[test]
    fn desktop_params_out_of_range_are_refused() {
        let ok = DesktopParams::default();
        assert_eq!(ok.validate(), Ok(()));
        let used = DesktopParams {
            cache_pct: 80,
            anon_pct: 30,
            ..ok
        };
        assert!(matches!(
            used.validate(),
            Err(DesktopParamsError::Used { .. })
        ));
        let ws = DesktopParams { ws_pct: 0, ..ok };
        assert_eq!(ws.validate(), Err(DesktopParamsError::WorkingSet(0)));
        let cold = DesktopParams {
            cold_permille: 1001,
            ..ok
        };
        assert_eq!(cold.validate(), Err(DesktopParamsError::Cold(1001)));
    }
}
