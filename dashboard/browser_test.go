package dashboard_test

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/redis/rueidis"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/shardgate/shardgate/cache"
	"github.com/shardgate/shardgate/dashboard"
	"github.com/shardgate/shardgate/internal/testcluster"
	"github.com/shardgate/shardgate/internal/testenv"
	"github.com/shardgate/shardgate/mover"
	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
	"github.com/shardgate/shardgate/server"
)

// browser finds a headless-capable Chromium. Without one the test skips
// on a developer's machine and fails under CI (SHARDGATE_CI set by
// .ci/run, which installs Debian's chromium).
func browser(t *testing.T) string {
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	if os.Getenv("SHARDGATE_CI") != "" {
		t.Fatal("chromium is required under CI (apt-get install chromium)")
	}
	t.Skip("no chromium on PATH (apt-get install chromium); CI runs this test")
	return ""
}

// The dashboard against a running cluster, in headless Chromium: 4 shards
// and 4096 cells; writes move the event and QPS figures; a rebalance to a
// fifth shard shows its moves and ends done. Screenshots are kept in the
// test's temp dir.
func TestDashboardInBrowser(t *testing.T) {
	bin := browser(t)
	redisAddr, prefix := testenv.Redis(t)
	rc, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{redisAddr}, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(rc.Close)
	cc, err := cache.Dial(redisAddr, cache.Options{Prefix: prefix + "c:"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cc.Close)
	c := testcluster.Start(t, 4, server.Options{
		Redis: rc, EventsPrefix: prefix, RunRelays: true, Cache: cc,
		RunMover: true, Mover: mover.ExecutorOptions{Interval: 100 * time.Millisecond},
	}, server.GRPCOptions{})
	mux := http.NewServeMux()
	mux.Handle("/metrics", c.Server.MetricsHandler())
	dashboard.Register(mux, c.Server.ClusterStatus)
	web := httptest.NewServer(mux)
	t.Cleanup(web.Close)

	conn, err := grpc.NewClient(c.Addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	data, admin := pb.NewDataServiceClient(conn), pb.NewAdminServiceClient(conn)

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	opts := append(chromedp.DefaultExecAllocatorOptions[:], chromedp.ExecPath(bin), chromedp.NoSandbox,
		chromedp.DisableGPU, chromedp.WindowSize(1400, 1000))
	actx, cancelAlloc := chromedp.NewExecAllocator(ctx, opts...)
	defer cancelAlloc()
	bctx, cancelBrowser := chromedp.NewContext(actx)
	defer cancelBrowser()

	waitFor := func(what, expr string) {
		t.Helper()
		deadline := time.Now().Add(90 * time.Second)
		for {
			var ok bool
			evalJS(t, bctx, expr, &ok)
			if ok {
				return
			}
			if time.Now().After(deadline) {
				var text string
				evalJS(t, bctx, `document.body.innerText`, &text)
				t.Fatalf("the page never showed %s; it reads:\n%s", what, text)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	shot := func(name string) {
		t.Helper()
		png, err := chromedp.Run(bctx, chromedp.FullScreenshot(100)) // 100: PNG
		if err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(t.TempDir(), name)
		if err := os.WriteFile(path, png, 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("screenshot: %s (%d bytes)", path, len(png))
		// SHARDGATE_ARTIFACTS keeps a copy past the test's end.
		if dir := os.Getenv("SHARDGATE_ARTIFACTS"); dir != "" {
			if err := os.WriteFile(filepath.Join(dir, name), png, 0o644); err != nil {
				t.Error(err)
			}
		}
	}

	if err := chromedp.Do(bctx, chromedp.Navigate(web.URL)); err != nil {
		t.Fatal(err)
	}
	waitFor("a first status", `Number(document.body.dataset.polls || 0) >= 1`)
	var cells, rows int
	evalJS(t, bctx, `document.querySelectorAll('#map .cell').length`, &cells)
	evalJS(t, bctx, `document.querySelectorAll('#shards tbody tr').length`, &rows)
	if cells != 4096 || rows != 4 {
		t.Fatalf("the page shows %d cells and %d shards, want 4096 and 4", cells, rows)
	}
	var published string
	evalJS(t, bctx, `document.getElementById('ev-total').textContent`, &published)
	if published != "0" {
		t.Fatalf("events published before any write: %q", published)
	}

	// Writes, steadily (some 100/s, sparing the machine's cores for the
	// moves), until the test ends: the figures must move.
	writes := make(chan struct{})
	var wg sync.WaitGroup
	stopWrites := make(chan struct{})
	wg.Go(func() {
		defer close(writes)
		for i := 0; ; i++ {
			select {
			case <-stopWrites:
				return
			case <-time.After(10 * time.Millisecond):
			}
			u := fmt.Sprintf("user-%d", i%500)
			// Failures are not this test's subject (the figures are): note
			// them and go on.
			if _, err := data.PutUser(ctx, &pb.PutUserRequest{UserId: u, ProfileJson: `{"i":1}`}); err != nil && ctx.Err() == nil {
				t.Logf("PutUser: %v", err)
				continue
			}
			if i%5 == 0 {
				tok, err := data.CreateSession(ctx, &pb.CreateSessionRequest{UserId: u, TtlSeconds: 600})
				for range 3 { // cached after the first
					if err == nil {
						_, err = data.GetSession(ctx, &pb.GetSessionRequest{Token: tok.GetToken()})
					}
				}
				if err != nil && ctx.Err() == nil {
					t.Logf("session: %v", err)
				}
			}
		}
	})
	defer func() { close(stopWrites); wg.Wait() }()
	waitFor("events published and per-shard QPS", `Number(document.getElementById('ev-total').textContent) >= 100 &&
		Number(document.getElementById('ev-rate').textContent) > 0 &&
		[...document.querySelectorAll('#shards td.qps')].filter(td => Number(td.textContent) > 0).length === 4`)
	shot("dashboard-load.png")

	// A fifth shard and a rebalance: the moves show with progress bars.
	if _, err := admin.AddShard(ctx, &pb.AddShardRequest{Name: "shard-4", Dsn: testenv.NewDatabase(t), Weight: 1}); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.StartRebalance(ctx, &pb.StartRebalanceRequest{FreezeBudgetMs: 100}); err != nil {
		t.Fatal(err)
	}
	waitFor("the moves", `document.querySelectorAll('#moves tbody tr .bar').length >= 1 && !document.getElementById('moves').hidden`)
	var movingSeen bool
	evalJS(t, bctx, `document.querySelectorAll('#map .cell.moving, #map .cell.frozen').length > 0`, &movingSeen)
	shot("dashboard-moving.png")
	waitFor("the rebalance done", `document.getElementById('rebalance').textContent.includes(' done:') &&
		[...document.querySelectorAll('#moves .pct')].every(p => p.textContent === '100%') &&
		document.querySelectorAll('#shards tbody tr').length === 5 &&
		Number(document.querySelector('#shards tr[data-shard="shard-4"]').children[2].textContent) >= 500 &&
		document.querySelectorAll('#map .cell.moving').length === 0`)
	if !movingSeen {
		t.Log("the rebalance moved too fast for the page to show moving cells mid-way")
	}
	shot("dashboard-done.png")
}

// evalJS evaluates expr in the page into out.
func evalJS[T any](t *testing.T, ctx context.Context, expr string, out *T) {
	t.Helper()
	v, err := chromedp.Run(ctx, chromedp.Evaluate[T](expr))
	if err != nil {
		t.Fatalf("evaluate %s: %v", expr, err)
	}
	*out = v
}
