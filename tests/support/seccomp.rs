//! seccomp filters for tests that run a child under a sandbox: classic BPF programs built from
//! the stable kernel ABI (linux/filter.h opcodes, linux/seccomp.h return values), installed for
//! the calling thread.

/// BPF_LD | BPF_W | BPF_ABS (the first two are 0): load a word of `seccomp_data`.
pub const LD_W_ABS: u16 = 0x20;
/// BPF_JMP | BPF_JEQ | BPF_K (BPF_K is 0).
pub const JEQ_K: u16 = 0x05 | 0x10;
/// BPF_RET | BPF_K.
pub const RET_K: u16 = 0x06;
pub const RET_ALLOW: u32 = 0x7fff_0000;
pub const RET_ERRNO: u32 = 0x0005_0000;

/// A statement: `code` with constant `k`.
pub fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

/// A jump on "accumulator == k": skip `jt` instructions if equal, `jf` if not.
pub fn jump(k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: JEQ_K,
        jt,
        jf,
        k,
    }
}

/// Installs `prog` for the calling thread (after `PR_SET_NO_NEW_PRIVS`). False if the kernel or
/// sandbox does not allow it.
pub fn install(prog: &[libc::sock_filter]) -> bool {
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: prctl reads `fprog` and the filter it points to, both alive
    // across the call; NO_NEW_PRIVS takes no pointers.
    unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
            && libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &fprog as *const libc::sock_fprog,
            ) == 0
    }
}

/// Installs, for the calling thread, a filter under which system call `nr` fails with EPERM.
/// False if the kernel or sandbox does not allow it.
pub fn forbid_syscall(nr: libc::c_long) -> bool {
    install(&[
        // seccomp_data.nr is at offset 0.
        stmt(LD_W_ABS, 0),
        jump(nr as u32, 0, 1),
        stmt(RET_K, RET_ERRNO | libc::EPERM as u32),
        stmt(RET_K, RET_ALLOW),
    ])
}
