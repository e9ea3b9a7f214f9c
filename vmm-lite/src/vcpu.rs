//! KVM setup (VM, one memory slot, one vCPU) and the vCPU state a checkpoint saves.
//!
//! No in-kernel irqchip is created: the guest never enables interrupts, so there is no LAPIC,
//! IOAPIC or PIT state to save, and `hlt` exits to the VMM (which treats it as the guest
//! stopping). The x87/SSE state is part of the XSAVE area.

use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES, Msrs, kvm_debugregs, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_userspace_memory_region, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::memory::GuestMemory;

/// The one memory slot: all of guest RAM at guest physical address 0.
pub const RAM_SLOT: u32 = 0;

/// MSRs saved with the vCPU (those KVM reports as supported). The guest uses none of them
/// beyond the TSC, but a restored vCPU should look like the saved one.
const SAVED_MSRS: [u32; 10] = [
    0x10,        // IA32_TSC
    0x174,       // IA32_SYSENTER_CS
    0x175,       // IA32_SYSENTER_ESP
    0x176,       // IA32_SYSENTER_EIP
    0x277,       // IA32_PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
];

/// Errors from KVM calls.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM ioctl failed; the step names which.
    #[error("KVM: {step}")]
    Kvm {
        /// What was being done.
        step: &'static str,
        /// The errno from KVM.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// An ioctl reported fewer MSRs than asked for.
    #[error("KVM: {step}: {done} of {asked} MSRs")]
    Msrs {
        /// get or set.
        step: &'static str,
        /// MSRs processed.
        done: usize,
        /// MSRs asked for.
        asked: usize,
    },
}

fn kvm_err(step: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm { step, source }
}

/// A KVM VM with guest RAM in slot [`RAM_SLOT`] and vCPU 0.
pub struct KvmVm {
    /// vCPU 0. Dropped first.
    pub vcpu: VcpuFd,
    /// The VM.
    pub vm: VmFd,
    /// /dev/kvm.
    pub kvm: Kvm,
    saved_msrs: Vec<u32>,
}

impl KvmVm {
    /// Creates the VM, registers `mem` as its RAM (with dirty-page logging if asked) and
    /// creates vCPU 0 with the host's supported CPUID.
    ///
    /// `mem` must outlive the returned value (the caller keeps both in one struct, memory last).
    pub fn new(mem: &mut GuestMemory, dirty_log: bool) -> Result<Self, VcpuError> {
        let kvm = Kvm::new().map_err(kvm_err("opening /dev/kvm"))?;
        let vm = kvm.create_vm().map_err(kvm_err("creating the VM"))?;
        let region = kvm_userspace_memory_region {
            slot: RAM_SLOT,
            flags: if dirty_log {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: 0,
            memory_size: mem.size(),
            userspace_addr: mem.host_addr() as u64,
        };
        // SAFETY: the region is exactly the mapping `mem` owns; the caller keeps `mem` alive
        // (and mapped) for as long as this VM exists.
        unsafe { vm.set_user_memory_region(region) }.map_err(kvm_err("registering guest RAM"))?;
        let vcpu = vm.create_vcpu(0).map_err(kvm_err("creating the vCPU"))?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("getting supported CPUID"))?;
        vcpu.set_cpuid2(&cpuid).map_err(kvm_err("setting CPUID"))?;
        let supported = kvm.get_msr_index_list().map_err(kvm_err("listing MSRs"))?;
        let saved_msrs = SAVED_MSRS
            .into_iter()
            .filter(|m| supported.as_slice().contains(m))
            .collect();
        Ok(KvmVm {
            vcpu,
            vm,
            kvm,
            saved_msrs,
        })
    }

    /// Sets boot registers.
    pub fn set_boot_registers(
        &self,
        sregs: impl FnOnce(kvm_sregs) -> kvm_sregs,
        regs: &kvm_regs,
    ) -> Result<(), VcpuError> {
        let current = self.vcpu.get_sregs().map_err(kvm_err("getting sregs"))?;
        self.vcpu
            .set_sregs(&sregs(current))
            .map_err(kvm_err("setting sregs"))?;
        if log::log_enabled!(log::Level::Trace) {
            log::trace!("vcpu: boot sregs {:?}", self.vcpu.get_sregs());
        }
        self.vcpu.set_regs(regs).map_err(kvm_err("setting regs"))
    }

    /// Saves the vCPU. Call only when no I/O exit is pending (see `Machine::pause`).
    pub fn save(&self) -> Result<VcpuState, VcpuError> {
        let v = &self.vcpu;
        let xcrs = if self.kvm.check_extension(Cap::Xcrs) {
            Some(v.get_xcrs().map_err(kvm_err("getting XCRs"))?)
        } else {
            None
        };
        Ok(VcpuState {
            regs: v.get_regs().map_err(kvm_err("getting regs"))?,
            sregs: v.get_sregs().map_err(kvm_err("getting sregs"))?,
            xsave: v.get_xsave().map_err(kvm_err("getting XSAVE state"))?,
            xcrs,
            msrs: self.get_msrs()?,
            events: v
                .get_vcpu_events()
                .map_err(kvm_err("getting vCPU events"))?,
            debugregs: v
                .get_debug_regs()
                .map_err(kvm_err("getting debug registers"))?,
        })
    }

    fn get_msrs(&self) -> Result<Vec<(u32, u64)>, VcpuError> {
        let entries: Vec<_> = self
            .saved_msrs
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).expect("few entries");
        let done = self
            .vcpu
            .get_msrs(&mut msrs)
            .map_err(kvm_err("getting MSRs"))?;
        if done != entries.len() {
            return Err(VcpuError::Msrs {
                step: "getting MSRs",
                done,
                asked: entries.len(),
            });
        }
        Ok(msrs.as_slice().iter().map(|e| (e.index, e.data)).collect())
    }

    /// Loads a saved vCPU (in the order Firecracker uses: sregs before MSRs and events).
    pub fn restore(&self, s: &VcpuState) -> Result<(), VcpuError> {
        let v = &self.vcpu;
        v.set_sregs(&s.sregs).map_err(kvm_err("setting sregs"))?;
        v.set_regs(&s.regs).map_err(kvm_err("setting regs"))?;
        // SAFETY: `s.xsave` is a whole kvm_xsave (4 KiB), which is what KVM_SET_XSAVE reads;
        // the CPUID set in `new` has no XSAVE features beyond that legacy size in use, since
        // the guest never sets CR4.OSXSAVE.
        unsafe { v.set_xsave(&s.xsave) }.map_err(kvm_err("setting XSAVE state"))?;
        if let Some(xcrs) = &s.xcrs {
            v.set_xcrs(xcrs).map_err(kvm_err("setting XCRs"))?;
        }
        let entries: Vec<_> = s
            .msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).expect("few entries");
        let done = v.set_msrs(&msrs).map_err(kvm_err("setting MSRs"))?;
        if done != entries.len() {
            return Err(VcpuError::Msrs {
                step: "setting MSRs",
                done,
                asked: entries.len(),
            });
        }
        v.set_vcpu_events(&s.events)
            .map_err(kvm_err("setting vCPU events"))?;
        v.set_debug_regs(&s.debugregs)
            .map_err(kvm_err("setting debug registers"))
    }
}

/// Everything KVM holds about vCPU 0 that the guest could observe.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// General-purpose registers, rip, rflags.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER.
    pub sregs: kvm_sregs,
    /// x87, SSE and extended state.
    pub xsave: kvm_xsave,
    /// XCR0 (if KVM supports KVM_GET_XCRS).
    pub xcrs: Option<kvm_xcrs>,
    /// (index, value) of [`SAVED_MSRS`] that KVM supports.
    pub msrs: Vec<(u32, u64)>,
    /// Pending exceptions, NMIs, interrupt shadow.
    pub events: kvm_vcpu_events,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
}
