// switchboard patch: this file imported https://github.com/jeehoonkang/membarrier-rs (a
// `sys_membarrier()` barrier with an `mprotect()` and a fence fallback, and a `light()` compiler
// fence for the other side). The one caller, the sleep protocol in `Reactor::wait`, now pairs a
// SeqCst fence here with one in `SleepNotifier::notify`, so the rest was dead code and is gone
// (shards/vendor/PATCHES.md).

use core::sync::atomic;

/// Issues the sleeper's barrier of the sleep protocol: a `SeqCst` fence.
///
/// The sleeper (`Reactor::wait`) stores `should_notify`, then this barrier, then re-reads the
/// channels; a waker (`SleepNotifier::notify`) publishes into a channel, then a SeqCst fence,
/// then reads `should_notify`. Two full fences make this store-buffering pattern safe: at least
/// one side sees the other's store. glommio issued `sys_membarrier(PRIVATE_EXPEDITED)` here (an
/// IPI to every core running a thread of the process, on every sleep) and only a compiler fence
/// on the waker's side.
#[inline]
pub(crate) fn heavy() {
    atomic::fence(atomic::Ordering::SeqCst);
}
