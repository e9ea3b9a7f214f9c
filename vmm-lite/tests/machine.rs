//! The machine API in-process: pausing completes the pending `out`, and a machine rebuilt from
//! a copy of RAM plus the saved state continues exactly like the original.

mod common;

use std::time::Instant;

use vmm_lite::block::BlockDevice;
use vmm_lite::driver::{PlanDriver, WorkLimit};
use vmm_lite::guest::{BootParams, DesktopParams, Workload};
use vmm_lite::machine::Machine;
use vmm_lite::memory::GuestMemory;
use vmm_lite::state;

/// `out dx, eax`: the guest's response instruction.
const OUT_DX_EAX: u8 = 0xef;

fn booted(t: &common::Setup) -> Machine {
    let block = BlockDevice::open(&t.disk, true).unwrap();
    let mem = GuestMemory::anonymous(8 << 20).unwrap();
    let params = BootParams {
        workload: Workload::Mixed,
        disk_size: block.size(),
        seed: 3,
        desktop: DesktopParams::default(),
    };
    Machine::boot(mem, block, &params).unwrap()
}

fn serve(m: &mut Machine, n: u64, pure: bool) -> u64 {
    let mut d = PlanDriver::new(WorkLimit::Count(n), Instant::now(), false).pure(pure);
    m.run(&mut d).unwrap();
    assert_eq!(d.work_done(), n);
    d.check().unwrap()
}

#[test]
fn pause_leaves_rip_after_the_response_out() {
    let t = common::Setup::new("4M");
    let mut m = booted(&t);
    serve(&mut m, 10, false);
    let saved = m.save().unwrap();
    let rip = saved.vcpu.regs.rip;
    let code = m.memory().range(rip - 1, 2).unwrap();
    assert_eq!(
        code[0], OUT_DX_EAX,
        "rip {rip:#x} should follow the completed out"
    );
    assert_ne!(
        code[1], OUT_DX_EAX,
        "rip {rip:#x} must not be at a pending out"
    );
}

#[test]
fn restored_copy_continues_like_the_original() {
    let t = common::Setup::new("4M");
    let mut original = booted(&t);
    let check = serve(&mut original, 50, false);
    let bytes = state::encode(&original.save().unwrap());
    let raw = t.path("mem.raw");
    std::fs::write(&raw, original.memory().as_slice()).unwrap();

    let saved = state::decode(&bytes).unwrap();
    let mem = GuestMemory::map_file_private(&raw, saved.devices.mem_size).unwrap();
    let block = BlockDevice::open(&t.disk, false).unwrap();
    let mut copy = Machine::restore(mem, block, &saved, 0).unwrap();
    assert_eq!(serve(&mut copy, 0, true), check);
    assert_eq!(serve(&mut copy, 25, false), serve(&mut original, 25, false));
    // The copy answered one extra CHECK.
    assert_eq!(copy.requests_served(), original.requests_served() + 1);
}

#[test]
fn same_seed_same_guest() {
    let t = common::Setup::new("4M");
    let (mut a, mut b) = (booted(&t), booted(&t));
    assert_eq!(serve(&mut a, 30, false), serve(&mut b, 30, false));
}
