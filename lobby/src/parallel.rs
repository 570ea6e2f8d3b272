//! Work split over the CPUs for the few jobs large enough to gain from it:
//! reading a large edit of the configuration, rendering a transaction that
//! rewrites many targets. Scoped threads, started per job: a thread's start
//! costs tens of microseconds, so callers split only work of milliseconds.

/// The threads a job of `size` may use: one below `shared_from`, else the
/// CPUs this process may run on, at most 4.
pub fn threads(size: usize, shared_from: usize) -> usize {
    if size < shared_from {
        return 1;
    }
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

/// `work` of each of `runs`, in their order: the first on this thread, the
/// others on a thread each. A run whose thread panicked gives its panic.
pub fn map_runs<T: Sync, R: Send>(
    runs: &[T],
    work: impl Fn(&T) -> R + Sync,
) -> Vec<std::thread::Result<R>> {
    let Some((first, rest)) = runs.split_first() else {
        return Vec::new();
    };
    if rest.is_empty() {
        return vec![Ok(work(first))];
    }
    std::thread::scope(|scope| {
        let work = &work;
        let others: Vec<_> = rest
            .iter()
            .map(|run| scope.spawn(move || work(run)))
            .collect();
        let first = work(first);
        std::iter::once(Ok(first))
            .chain(others.into_iter().map(|other| other.join()))
            .collect()
    })
}

/// `work` of each of `items`, in their order; from `shared_from` items on,
/// spread over [`threads`] in runs of neighbours. Panics where `work` does.
pub fn map_items<T: Sync, R: Send>(
    items: &[T],
    shared_from: usize,
    work: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    let threads = threads(items.len(), shared_from);
    let runs: Vec<&[T]> = items.chunks(items.len().div_ceil(threads).max(1)).collect();
    map_runs(&runs, |run| run.iter().map(&work).collect::<Vec<R>>())
        .into_iter()
        .flat_map(|run| run.unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_come_back_in_their_order_with_their_panics() {
        let runs = [1, 2, 3, 4];
        let doubled: Vec<i32> = map_runs(&runs, |n| n * 2)
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(doubled, [2, 4, 6, 8]);
        assert!(map_runs(&[] as &[i32], |n| *n).is_empty());
        let outcomes = map_runs(&runs, |n| {
            assert_ne!(*n, 3, "a run that panics");
            *n
        });
        assert!(outcomes[2].is_err());
        assert_eq!(*outcomes[3].as_ref().unwrap(), 4);
    }

    #[test]
    fn items_come_back_in_their_order_shared_or_not() {
        let items: Vec<u32> = (0..100).collect();
        for shared_from in [1, 50, 1000] {
            let squares = map_items(&items, shared_from, |n| n * n);
            assert_eq!(squares, items.iter().map(|n| n * n).collect::<Vec<_>>());
        }
        assert!(map_items(&[] as &[u32], 1, |n| *n).is_empty());
    }
}
