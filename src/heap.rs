//! Heap bytes in use, counted by the binary's allocator while a benchmark asks: the scale
//! benchmark's library memory per endpoint. The resident set cannot say it: an allocator that
//! keeps freed pages (mimalloc, which the binary runs on) makes a balancer's growth read as
//! nothing, or as pages an earlier one already paid for.
//!
//! [`Counting`] wraps the process's allocator; counting is off until [`start`] turns it on, so
//! the call path pays one relaxed load per allocation, not an atomic add. Knows nothing of what
//! is measured.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering::Relaxed};

static ON: AtomicBool = AtomicBool::new(false);
static LIVE: AtomicIsize = AtomicIsize::new(0);

/// An allocator that counts the bytes `A` hands out and takes back while a [`Measure`] runs.
#[derive(Debug, Default)]
pub struct Counting<A>(pub A);

fn count(delta: isize) {
    if ON.load(Relaxed) {
        LIVE.fetch_add(delta, Relaxed);
    }
}

// SAFETY: every call goes to `A` unchanged; counting only reads the layouts.
unsafe impl<A: GlobalAlloc> GlobalAlloc for Counting<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { self.0.alloc(layout) };
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { self.0.alloc_zeroed(layout) };
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { self.0.dealloc(ptr, layout) };
        count(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { self.0.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            count(new_size as isize - layout.size() as isize);
        }
        p
    }
}

/// Counting, from [`start`] until it is dropped.
#[derive(Debug)]
pub struct Measure {
    base: isize,
}

/// Starts counting, or `None` when the process's allocator is not a [`Counting`] one (a test
/// binary, a program of the library's user). Measures must not overlap: dropping one stops
/// counting.
pub fn start() -> Option<Measure> {
    ON.store(true, Relaxed);
    let before = LIVE.load(Relaxed);
    let probe = std::hint::black_box(Box::new([0u8; 64]));
    let counted = LIVE.load(Relaxed) != before;
    drop(probe);
    if !counted {
        ON.store(false, Relaxed);
        return None;
    }
    Some(Measure {
        base: LIVE.load(Relaxed),
    })
}

impl Measure {
    /// Bytes allocated and not freed since the start, from any thread (negative when more that
    /// was allocated before was freed).
    pub fn grown(&self) -> isize {
        LIVE.load(Relaxed) - self.base
    }
}

impl Drop for Measure {
    fn drop(&mut self) {
        ON.store(false, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn without_a_counting_allocator_there_is_no_measure() {
        // The test binary runs on the system allocator, uncounted.
        assert!(super::start().is_none());
        assert!(!super::ON.load(super::Relaxed));
    }
}
