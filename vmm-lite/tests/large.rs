//! Guests over 4 GiB: the page directories past the first four map RAM above 4 GiB, and the
//! heap skips the APIC page (KVM turns guest accesses there into MMIO exits), so a workload
//! whose pages run past it keeps working and every page lands where the VMM expects it.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Instant;

use vmm_lite::abi::{APIC_HOLE_ADDR, HEAP_ADDR, PAGE_SIZE, PD_HIGH_ADDR, PDPT_ADDR};
use vmm_lite::block::BlockDevice;
use vmm_lite::driver::{PlanDriver, WorkLimit};
use vmm_lite::guest::{BootParams, DesktopParams, Workload};
use vmm_lite::machine::Machine;
use vmm_lite::memory::GuestMemory;

const GIB: u64 = 1 << 30;

fn marker(block: u64) -> Vec<u8> {
    let word = block | 0x5a5a << 48;
    (0..PAGE_SIZE / 8)
        .flat_map(|_| word.to_le_bytes())
        .collect()
}

#[test]
fn a_guest_over_4_gib_maps_high_ram_and_skips_the_apic_page() {
    common::require_kvm();
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    // A sparse disk a little over 4 GiB: the page cache workload reads all of it (3/4 of a
    // 6 GiB heap is more), so its heap pages run past the APIC page and past 4 GiB. Marked
    // blocks around the APIC page and at the end say where each one landed.
    let blocks = (4 * GIB + (4 << 20)) / PAGE_SIZE;
    let apic = (APIC_HOLE_ADDR - HEAP_ADDR) / PAGE_SIZE;
    let marked = [0, apic - 1, apic, apic + 1, blocks - 1];
    let disk = dir.path().join("disk.img");
    let f = File::create(&disk).unwrap();
    f.set_len(blocks * PAGE_SIZE).unwrap();
    for &b in &marked {
        f.write_all_at(&marker(b), b * PAGE_SIZE).unwrap();
    }
    drop(f);

    let block = BlockDevice::open(&disk, true).unwrap();
    let params = BootParams {
        workload: Workload::Pagecache,
        disk_size: block.size(),
        seed: 5,
        desktop: DesktopParams::default(),
    };
    let mem = GuestMemory::anonymous(6 * GIB).unwrap();
    let mut vm = Machine::boot(mem, block, &params).unwrap();
    let mut d = PlanDriver::new(WorkLimit::Count(200), Instant::now(), false);
    vm.run(&mut d).unwrap();
    assert_eq!(d.work_done(), 200);
    let check = d.check().unwrap();

    let ram = vm.memory();
    // Six page directories: GiB 4 and 5 come from the high ones.
    for gib in 0..6u64 {
        let pdpte = u64::from_le_bytes(
            ram.range(PDPT_ADDR + gib * 8, 8)
                .unwrap()
                .try_into()
                .unwrap(),
        );
        if gib >= 4 {
            assert_eq!(pdpte & !0xfff, PD_HIGH_ADDR + (gib - 4) * PAGE_SIZE);
        }
        assert_ne!(pdpte & 1, 0, "PDPT entry {gib} not present");
    }
    // Heap page p holds disk block p; from the APIC page up, one page higher.
    for &b in &marked {
        let addr = HEAP_ADDR + (b + u64::from(b >= apic)) * PAGE_SIZE;
        assert!(
            ram.range(addr, PAGE_SIZE).unwrap() == marker(b).as_slice(),
            "disk block {b} is not at {addr:#x}"
        );
    }
    assert!(HEAP_ADDR + blocks * PAGE_SIZE > 4 * GIB);
    assert!(
        ram.range(APIC_HOLE_ADDR, PAGE_SIZE)
            .unwrap()
            .iter()
            .all(|&x| x == 0),
        "the guest wrote to the APIC page"
    );
    assert_ne!(check, 0);
}
