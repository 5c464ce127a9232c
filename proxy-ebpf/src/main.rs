//! cgroup v2 programs that send the outbound TCP connects of enrolled pods to the node
//! proxy's listener inside the pod's own network namespace.
//!
//! - `pd_connect4` (cgroup/connect4): enrolled? listener alive? then remember the original
//!   destination by socket cookie and rewrite it to 127.0.0.1:<listener port>. With no
//!   listener the namespace's fail mode decides, here in the kernel, per connect.
//! - `pd_sock_ops` (sockops): once the client port is chosen (TCP_CONNECT_CB, before the
//!   SYN), publish the original destination under (netns cookie, client port), the key the
//!   accepting side can build; remove both entries when the socket closes.
//! - `pd_getpeername4` (cgroup/getpeername4): the app sees its original peer, not the proxy.
//!
//! Only the bpf target gets the programs; a host build of the workspace (`cargo build
//! --workspace`) sees an empty binary, as in aya-template.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
