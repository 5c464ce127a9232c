//! Capture: the eBPF programs and their pinned maps, pod cgroups, pod network namespaces,
//! and enrolment (which pods the kernel sends to which listener). Reads the snapshot; the
//! data path reads the original-destination table it provides.
pub mod bpf;
pub mod cgroup;
pub mod enrol;
pub mod iptables;
pub mod netns;
