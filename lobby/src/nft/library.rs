//! libnftables inside the daemon: the library the `nft` binary is a thin
//! shell around, loaded at run time (`libnftables.so.1`, which every
//! nftables package ships for its `nft`) once per process; contexts are
//! opened from it, the transactions' one for as long as the daemon runs.
//!
//! Why not a process per transaction: at 1,000 targets x 10 upstreams, a
//! one-target change took a fresh `nft -f` 22-36 ms and the same
//! transaction through a context kept open 3.1-3.6 ms (nft 1.0.6, kernel
//! 6.18, in a network namespace; the README's control-plane run of
//! 2026-12-01 has the daemon's figures). A new process starts, reads the
//! table's objects to resolve names, and when it closes its netlink socket
//! waits for the kernel to free what the transaction removed; a context
//! kept open does none of that per transaction. Its cache of the table
//! costs memory instead (~35 MB of the daemon's RSS after a transaction
//! that rewrote every chain at 1,000 x 10).
//!
//! A context is not safe to share between threads: it lives on a thread
//! of its own, which runs one command at a time.
use std::{
    ffi::{CStr, CString, c_char, c_int, c_uint, c_void},
    sync::{OnceLock, mpsc},
};

use tokio::sync::oneshot;

/// The soname: the ABI every nft since 0.9 ships.
const SONAME: &str = "libnftables.so.1";

/// `enum nft_ctx_output_flags` of libnftables.h.
pub const OUTPUT_STATELESS: c_uint = 1 << 2;
pub const OUTPUT_JSON: c_uint = 1 << 4;

#[derive(Clone, Debug, thiserror::Error)]
pub enum LibraryError {
    #[error("loading {SONAME}: {0}")]
    Load(String),
    #[error("{SONAME} has no symbol {1}: {0}")]
    Symbol(String, &'static str),
    #[error("libnftables could not create a context")]
    Context,
    #[error("starting the libnftables thread: {0}")]
    Thread(String),
}

/// What one command did: whether nft accepted it, what it printed, and
/// what it said about a refusal (nft's own words, as on its stderr).
#[derive(Debug)]
pub struct Outcome {
    pub accepted: bool,
    pub output: Vec<u8>,
    pub said: String,
}

struct Command {
    text: CString,
    output_flags: c_uint,
    reply: oneshot::Sender<Outcome>,
}

/// The handle of the context's thread; the thread and the context end
/// when it is dropped.
pub struct Libnftables {
    commands: mpsc::Sender<Command>,
}

impl Libnftables {
    /// Loads the library and opens a context, in the network namespace of
    /// the calling process.
    pub fn open() -> Result<Self, LibraryError> {
        Self::open_for(RESERVED_HEAP)
    }

    /// [`Libnftables::open`] for one script of `bytes`: its thread
    /// reserves the heap such a script takes, not the most any does.
    pub fn open_for_script(bytes: usize) -> Result<Self, LibraryError> {
        Self::open_for(
            bytes
                .saturating_mul(HEAP_PER_SCRIPT_BYTE)
                .min(RESERVED_HEAP),
        )
    }

    fn open_for(heap: usize) -> Result<Self, LibraryError> {
        let (commands, received) = mpsc::channel::<Command>();
        let (ready, opened) = mpsc::channel();
        std::thread::Builder::new()
            .name("libnftables".into())
            .spawn(move || {
                reserve_heap(heap);
                let context = match Context::open() {
                    Ok(context) => {
                        let _ = ready.send(Ok(()));
                        context
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                for command in received {
                    let outcome = context.run(&command.text, command.output_flags);
                    // The asker may have given up (its task was dropped).
                    let _ = command.reply.send(outcome);
                }
            })
            .map_err(|e| LibraryError::Thread(e.to_string()))?;
        opened
            .recv()
            .map_err(|_| LibraryError::Context)?
            .map(|()| Self { commands })
    }

    /// Runs `text` (a script, or a command such as `list table inet
    /// lobby`) with `output_flags`, as `nft -f -` would.
    pub async fn run(&self, text: &str, output_flags: c_uint) -> Outcome {
        let Ok(text) = CString::new(text) else {
            return Outcome {
                accepted: false,
                output: Vec::new(),
                said: "the script holds a NUL byte".to_owned(),
            };
        };
        let (reply, outcome) = oneshot::channel();
        let sent = self.commands.send(Command {
            text,
            output_flags,
            reply,
        });
        match (sent, outcome.await) {
            (Ok(()), Ok(outcome)) => outcome,
            // Only a panic on the context's thread ends it early.
            _ => panic!("the libnftables thread ended"),
        }
    }
}

/// How much of its malloc heap the context's thread reserves up front:
/// the library's memory for a transaction rewriting 1,000 x 10 upstreams
/// (~37 MB), with room, within glibc's 64 MB a heap.
const RESERVED_HEAP: usize = 56 << 20;
/// The library's heap per byte of a script that builds a table, with
/// room: ~37 MB for the 728 KB of 1,000 x 10's. Reserving the whole
/// [`RESERVED_HEAP`] for the table's first transaction took a first
/// start at 1 x 10 from 1 to 5 ms.
const HEAP_PER_SCRIPT_BYTE: usize = 64;
/// Below glibc's smallest mmap threshold (128 KiB), so that each block
/// comes from the thread's heap.
const RESERVING_BLOCK: usize = 96 << 10;

/// Grows the calling thread's malloc heap by `heap` bytes (at most
/// [`RESERVED_HEAP`]) in up to a few hundred steps and frees it again. glibc
/// gives every thread but the main one a heap of its own, which it grows by the
/// page as allocations need it, an `mprotect` each time (and keeps grown when
/// it frees the memory, returning only the pages): a first start at 1,000 x 10
/// made ~9,600 of them on the transactions' thread, 4.6% of its time, where the
/// `nft` binary, on the main heap with its 128 KiB steps, makes 14. Listings
/// run on threads of their own, and glibc hands a finished thread's heap to the
/// next one: they reserve too.
fn reserve_heap(heap: usize) {
    let blocks: Vec<*mut c_void> = (0..heap / RESERVING_BLOCK)
        // SAFETY: plain malloc; a null (no memory) is freed as a no-op.
        .map(|_| unsafe { libc::malloc(RESERVING_BLOCK) })
        .collect();
    for block in blocks {
        // SAFETY: each came from malloc above and is freed once.
        unsafe { libc::free(block) }
    }
}

type CtxNew = unsafe extern "C" fn(c_uint) -> *mut c_void;
type CtxFree = unsafe extern "C" fn(*mut c_void);
type CtxCall = unsafe extern "C" fn(*mut c_void) -> c_int;
type CtxSetFlags = unsafe extern "C" fn(*mut c_void, c_uint);
type CtxBuffer = unsafe extern "C" fn(*mut c_void) -> *const c_char;
type RunCmd = unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int;

/// The library's functions Lobby calls.
#[derive(Clone, Copy)]
struct Symbols {
    new: CtxNew,
    free: CtxFree,
    buffer_output: CtxCall,
    buffer_error: CtxCall,
    set_output_flags: CtxSetFlags,
    run_cmd: RunCmd,
    output: CtxBuffer,
    error: CtxBuffer,
}

impl Symbols {
    /// The library, loaded on first use; a failure is the same for every
    /// later caller.
    fn get() -> Result<Self, LibraryError> {
        static SYMBOLS: OnceLock<Result<Symbols, LibraryError>> = OnceLock::new();
        SYMBOLS.get_or_init(Self::load).clone()
    }

    fn load() -> Result<Self, LibraryError> {
        let soname = CString::new(SONAME).expect("no NUL in the soname");
        // SAFETY: a NUL-terminated name; the library stays loaded for the
        // life of the process (never dlclosed: its functions are kept).
        let handle = unsafe { libc::dlopen(soname.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            return Err(LibraryError::Load(dl_error()));
        }
        // SAFETY (each call): `handle` is the library's, and each field's
        // type is the libnftables.h signature of its function, stable
        // since the library's 0.9 ABI.
        unsafe {
            Ok(Self {
                new: function(handle, c"nft_ctx_new")?,
                free: function(handle, c"nft_ctx_free")?,
                buffer_output: function(handle, c"nft_ctx_buffer_output")?,
                buffer_error: function(handle, c"nft_ctx_buffer_error")?,
                set_output_flags: function(handle, c"nft_ctx_output_set_flags")?,
                run_cmd: function(handle, c"nft_run_cmd_from_buffer")?,
                output: function(handle, c"nft_ctx_get_output_buffer")?,
                error: function(handle, c"nft_ctx_get_error_buffer")?,
            })
        }
    }
}

/// The function `name` of the library `handle`, as an `F`.
///
/// # Safety
/// `handle` must come from dlopen and `F` be the function pointer type of
/// `name`'s signature.
unsafe fn function<F: Copy>(handle: *mut c_void, name: &'static CStr) -> Result<F, LibraryError> {
    const { assert!(size_of::<F>() == size_of::<*mut c_void>()) };
    // SAFETY: a handle dlopen returned and a NUL-terminated name.
    let address = unsafe { libc::dlsym(handle, name.as_ptr()) };
    if address.is_null() {
        return Err(LibraryError::Symbol(
            dl_error(),
            name.to_str().expect("an ASCII name"),
        ));
    }
    // SAFETY: the caller's promise; the sizes are equal (checked above).
    Ok(unsafe { std::mem::transmute_copy(&address) })
}

/// One context, and the functions it is used with.
struct Context {
    context: *mut c_void,
    symbols: Symbols,
}

impl Context {
    fn open() -> Result<Self, LibraryError> {
        let symbols = Symbols::get()?;
        // SAFETY: NFT_CTX_DEFAULT (0) is the flag set nft uses.
        let raw = unsafe { (symbols.new)(0) };
        if raw.is_null() {
            return Err(LibraryError::Context);
        }
        let context = Self {
            context: raw,
            symbols,
        };
        // SAFETY: a live context. Both buffer what nft would print, which
        // the daemon must not: its stdout and stderr are its log.
        let buffered =
            unsafe { (symbols.buffer_output)(raw) == 0 && (symbols.buffer_error)(raw) == 0 };
        if !buffered {
            return Err(LibraryError::Context);
        }
        Ok(context)
    }

    fn run(&self, text: &CStr, output_flags: c_uint) -> Outcome {
        // SAFETY: a live context, used by this thread only; the buffers'
        // strings are copied out before the next call replaces them.
        let symbols = self.symbols;
        unsafe {
            (symbols.set_output_flags)(self.context, output_flags);
            let accepted = (symbols.run_cmd)(self.context, text.as_ptr()) == 0;
            Outcome {
                accepted,
                output: buffer(symbols.output, self.context).into_bytes(),
                said: buffer(symbols.error, self.context).trim().to_owned(),
            }
        }
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: the live context, freed once.
        unsafe { (self.symbols.free)(self.context) }
    }
}

/// A context's buffer as text, empty when there is none.
///
/// # Safety
/// `context` must be live and `get` one of its buffer getters.
unsafe fn buffer(get: CtxBuffer, context: *mut c_void) -> String {
    // SAFETY: the caller's promise; the getter returns NULL or a
    // NUL-terminated string owned by the context.
    let text = unsafe { get(context) };
    if text.is_null() {
        return String::new();
    }
    // SAFETY: as above.
    unsafe { CStr::from_ptr(text) }
        .to_string_lossy()
        .into_owned()
}

fn dl_error() -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated message.
    let message = unsafe { libc::dlerror() };
    if message.is_null() {
        "unknown error".to_owned()
    } else {
        // SAFETY: as above.
        unsafe { CStr::from_ptr(message) }
            .to_string_lossy()
            .into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Commands that need no privilege: the library answers them without
    /// the kernel's ruleset.
    #[tokio::test]
    async fn a_context_runs_commands_and_reports_refusals_in_nfts_words() {
        let Ok(library) = Libnftables::open() else {
            // Machines without nftables cannot run this; CI installs it.
            assert!(
                std::env::var_os("CI").is_none(),
                "libnftables.so.1 is missing"
            );
            return;
        };
        let refused = library.run("add rule inet t c bogus keyword", 0).await;
        assert!(!refused.accepted);
        // nft's own words: the error, the command, a caret under the fault.
        assert!(refused.said.starts_with("Error: "), "{}", refused.said);
        assert!(refused.said.contains("bogus keyword\n"), "{}", refused.said);
        let nul = library.run("list tables\0", 0).await;
        assert!(!nul.accepted);
    }
}
