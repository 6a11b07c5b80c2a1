package mptcpep

import (
	"runtime"
	"sync"
	"testing"
	"time"
)

// The in-process worlds check that every goroutine they started ends:
// at the world's cleanup, after its endpoints, stacks and links are
// closed, the goroutine count must come back to what it was before the
// world was built.
//
// The count is process-wide, so it says something only while this world
// is the only one: a world that lived at the same time as another
// (t.Parallel tests) skips the check and logs why. Filtering the stacks
// for this package's functions instead would not help there either: the
// goroutines of the other world run the same functions. Non-world tests
// running alongside leave no goroutines behind, and the check waits for
// transient ones (up to goroutineWait).

// goroutineWait bounds the wait for a world's goroutines to end: the
// longest legitimate tail is the 2 s linger of a closed connection (cut
// short by the endpoint's Close) and gVisor's own shutdown.
const goroutineWait = 5 * time.Second

var liveWorlds struct {
	sync.Mutex
	overlapped map[*worldLife]bool
}

// worldLife is one world's entry in liveWorlds.
type worldLife struct{ overlapped bool }

// checkGoroutines records the goroutine count now and, in t.Cleanup,
// fails the test with a dump of every goroutine if the count has not
// come back to it within goroutineWait. Call it before the world builds
// anything: cleanups run last-in first-out, so the check runs after the
// world's own cleanup has closed everything.
func checkGoroutines(t *testing.T) {
	t.Helper()
	life := &worldLife{}
	liveWorlds.Lock()
	if liveWorlds.overlapped == nil {
		liveWorlds.overlapped = make(map[*worldLife]bool)
	}
	for w := range liveWorlds.overlapped {
		w.overlapped, life.overlapped = true, true
	}
	liveWorlds.overlapped[life] = true
	liveWorlds.Unlock()
	base := runtime.NumGoroutine()
	t.Cleanup(func() {
		liveWorlds.Lock()
		delete(liveWorlds.overlapped, life)
		overlapped := life.overlapped
		liveWorlds.Unlock()
		if overlapped {
			t.Log("goroutine check skipped: another world lived at the same time")
			return
		}
		deadline := time.Now().Add(goroutineWait)
		n := runtime.NumGoroutine()
		for n > base && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
			n = runtime.NumGoroutine()
		}
		if n > base {
			buf := make([]byte, 1<<20)
			buf = buf[:runtime.Stack(buf, true)]
			t.Errorf("%d goroutines %v after the world closed, %d before it was built:\n%s", n, goroutineWait, base, buf)
		}
	})
}
