//! What the machine an agent runs on offers: its CPUs, its memory (within the limits of its
//! control group, in a container) and its GPUs, as far as the host shows them. An agent that is
//! not told what it offers reports this.

use crate::model::domain::Resources;

/// The resources of this machine. CPUs: those this process may use (a container's CPU quota
/// included); memory: the total, or the control group's limit if lower; GPUs: the NVIDIA devices
/// its driver lists (other GPUs are not seen: say `--gpu`).
pub fn resources() -> Resources {
    let cpu = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let mut system = sysinfo::System::new();
    system.refresh_memory();
    let total = system.total_memory();
    let limited = system.cgroup_limits().map_or(total, |limits| limits.total_memory.min(total));
    Resources { cpu, memory_mb: limited / (1024 * 1024), gpu: nvidia_gpus() }
}

/// One directory per GPU in `/proc/driver/nvidia/gpus`, where the NVIDIA driver is loaded.
fn nvidia_gpus() -> u32 {
    std::fs::read_dir("/proc/driver/nvidia/gpus").map_or(0, |entries| entries.flatten().count() as u32)
}

#[cfg(test)]
mod tests {
    #[test]
    fn this_machine_has_cpus_and_memory() {
        let host = super::resources();
        let cpus = std::thread::available_parallelism().unwrap().get() as f64;
        assert_eq!(host.cpu, cpus);
        assert!(host.memory_mb >= 256, "{host:?}");
    }
}
