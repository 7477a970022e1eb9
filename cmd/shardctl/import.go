package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vbauerster/mpb/v8"
	"github.com/vbauerster/mpb/v8/decor"

	"github.com/shardgate/shardgate/catalog"
	"github.com/shardgate/shardgate/importer"
)

// Import commands talk to the source, the catalog and the shards directly
// (like 'migrate up'): a bulk copy should not squeeze through gRPC.

type importSource struct {
	Mapping string `required:"" type:"existingfile" help:"Mapping file (YAML): which source table becomes which entity, and how."`
	From    string `required:"" help:"Source database DSN (the unsharded PostgreSQL)." env:"SHARDGATE_IMPORT_FROM"`
}

func (s importSource) load() (*importer.Mapping, error) {
	b, err := os.ReadFile(s.Mapping)
	if err != nil {
		return nil, err
	}
	m, err := importer.ParseMapping(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", s.Mapping, err)
	}
	return m, nil
}

func signalContext() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
}

type importCheckCmd struct {
	importSource
	Catalog      string `help:"Catalog database DSN: report the spread per shard of this cluster (default: partitions of a default cluster)." env:"SHARDGATE_CATALOG"`
	MaxJSONBytes int    `name:"max-json-bytes" help:"Largest JSON value accepted (the servers' --max-json-bytes)." default:"65536"`
}

func (c importCheckCmd) Run(g *globals) error {
	m, err := c.load()
	if err != nil {
		return err
	}
	ctx, cancel := signalContext()
	defer cancel()
	opts := importer.CheckOptions{MaxJSONBytes: c.MaxJSONBytes}
	if c.Catalog != "" {
		cat, err := catalog.Open(ctx, c.Catalog)
		if err != nil {
			return err
		}
		defer cat.Close()
		topo, err := cat.LoadTopology(ctx)
		if err != nil {
			return err
		}
		opts.Partitions, opts.Owner = topo.PartitionCount, topo.Table.Owner
	}
	src, err := importer.ConnectSource(ctx, c.From)
	if err != nil {
		return fmt.Errorf("source: %w", err)
	}
	defer src.Close(context.Background())
	rep, err := importer.Check(ctx, src, m, opts)
	if err != nil {
		return err
	}
	if g.JSON {
		enc := json.NewEncoder(g.out)
		enc.SetIndent("", "  ")
		if err := enc.Encode(rep); err != nil {
			return err
		}
	} else {
		printCheck(g, rep)
	}
	if !rep.OK {
		return errors.New("the mapping does not import cleanly (see above); nothing was written")
	}
	return nil
}

func printCheck(g *globals, rep *importer.CheckReport) {
	w := g.table("TABLE", "SOURCE", "ENTITY", "ROWS", "INVALID", "DUPLICATES", "PARTITIONS", "ROWS/PARTITION")
	for _, t := range rep.Tables {
		fmt.Fprintf(w, "%s\t%s\t%s\t%d\t%d\t%d\t%d\t%d-%d\n", t.Name, t.Source, t.Entity, t.Rows, t.Invalid,
			t.Duplicates, t.Partitions, t.MinPartitionRows, t.MaxPartitionRows)
	}
	w.Flush()
	for _, t := range rep.Tables {
		if len(t.PerShard) > 0 {
			var parts []string
			for _, s := range importer.SortedShards(t.PerShard) {
				parts = append(parts, fmt.Sprintf("%s %d", s, t.PerShard[s]))
			}
			fmt.Fprintf(g.out, "%s per shard: %s\n", t.Name, strings.Join(parts, ", "))
		}
		for _, e := range t.Errors {
			fmt.Fprintf(g.out, "error: %s\n", e)
		}
		for _, e := range t.Warnings {
			fmt.Fprintf(g.out, "warning: %s: %s\n", t.Name, e)
		}
	}
	for _, p := range rep.Problems {
		fmt.Fprintf(g.out, "error: %s\n", p)
	}
	if rep.OK {
		fmt.Fprintln(g.out, "\nthe mapping imports cleanly (dry run: nothing was written)")
	}
}

type importTarget struct {
	Catalog string `required:"" help:"Catalog database DSN of the Shardgate cluster." env:"SHARDGATE_CATALOG"`
	Name    string `help:"Import name (one import per name at a time)." default:"default"`
}

func (t importTarget) open(ctx context.Context, maxConns int32) (*importer.Cluster, error) {
	return importer.OpenCluster(ctx, t.Catalog, maxConns)
}

type importStartCmd struct {
	Mapping    string `type:"existingfile" help:"Mapping file (YAML): which source table becomes which entity, and how."`
	From       string `help:"Source database DSN (the unsharded PostgreSQL)." env:"SHARDGATE_IMPORT_FROM"`
	FromNDJSON string `name:"from-ndjson" type:"existingdir" help:"Load a 'shardctl export' directory instead of a source database (run again to finish an interrupted load)."`
	importTarget
	Parallel     int    `help:"Batches written at once per shard." default:"2"`
	BatchRows    int    `name:"batch-rows" help:"Rows per batch to one shard." default:"5000"`
	Readers      int    `help:"Source connections reading each table at once (ranges of its keys, one snapshot)." default:"2"`
	Events       bool   `help:"Publish a change event for every imported row and every change followed (off: they publish none; config always does). Recorded with the import."`
	SkipInvalid  bool   `name:"skip-invalid" help:"Count rows that do not map to a valid entity and write them to --rejects instead of stopping."`
	Rejects      string `help:"File the rejected rows are appended to (NDJSON), with --skip-invalid."`
	MaxJSONBytes int    `name:"max-json-bytes" help:"Largest JSON value accepted (the servers' --max-json-bytes)." default:"65536"`
	Follow       bool   `help:"After the bulk phase, follow the source's changes in this process (as 'shardctl import follow') until interrupted or cut over."`
}

func (c importStartCmd) Run(g *globals) error {
	if c.FromNDJSON != "" {
		if c.Mapping != "" || c.From != "" || c.Follow {
			return errors.New("--from-ndjson loads an export: no --mapping, --from or --follow")
		}
		return c.runNDJSON(g)
	}
	if c.Mapping == "" || c.From == "" {
		return errors.New("give --mapping and --from (a source database), or --from-ndjson DIR")
	}
	m, err := (importSource{Mapping: c.Mapping, From: c.From}).load()
	if err != nil {
		return err
	}
	if c.SkipInvalid != (c.Rejects != "") {
		return errors.New("--skip-invalid and --rejects FILE go together")
	}
	if c.Parallel < 1 || c.Parallel > 64 {
		return fmt.Errorf("--parallel %d: want 1-64", c.Parallel)
	}
	if c.Readers < 0 || c.Readers > 16 {
		return fmt.Errorf("--readers %d: want 1-16", c.Readers)
	}
	ctx, cancel := signalContext()
	defer cancel()
	cl, err := c.open(ctx, int32(c.Parallel)+1)
	if err != nil {
		return err
	}
	defer cl.Close()
	opts := importer.Options{
		Name: c.Name, Parallel: c.Parallel, BatchRows: c.BatchRows, Readers: c.Readers, Events: c.Events,
		SkipInvalid: c.SkipInvalid, MaxJSONBytes: c.MaxJSONBytes,
	}
	if c.Rejects != "" {
		f, err := os.OpenFile(c.Rejects, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
		if err != nil {
			return err
		}
		defer f.Close()
		opts.Rejects = f
	}
	start := time.Now()
	var view *importBars
	if g.JSON {
		enc := json.NewEncoder(g.out)
		var mu sync.Mutex
		opts.Progress = func(p importer.Progress) {
			mu.Lock()
			defer mu.Unlock()
			enc.Encode(p)
		}
	} else {
		view = newImportBars(g.out)
		opts.Progress = view.update
	}
	err = importer.Start(ctx, cl, m, c.From, opts)
	if view != nil {
		view.done(err == nil)
	}
	if err != nil {
		return err
	}
	rec, tables, err := cl.Catalog.GetImport(ctx, c.Name)
	if err != nil {
		return err
	}
	var rows, rejected int64
	for _, t := range tables {
		rows += t.RowsCopied
		rejected += t.RowsRejected
	}
	if g.JSON {
		err = json.NewEncoder(g.out).Encode(map[string]any{"import": rec.Name, "state": rec.State, "rows": rows,
			"rejected": rejected, "seconds": time.Since(start).Seconds(), "start_lsn": rec.StartLSN})
	} else {
		fmt.Fprintf(g.out, "bulk phase done: %d rows (%d rejected) in %s; the source's changes since LSN %s wait in slot %s\n",
			rows, rejected, time.Since(start).Round(time.Millisecond), rec.StartLSN, rec.Slot)
		if !c.Follow {
			fmt.Fprintln(g.out, "next: 'shardctl import follow' to apply them, then 'shardctl import cutover'")
		}
	}
	if err != nil || !c.Follow {
		return err
	}
	return runFollow(ctx, g, cl, m, c.From, c.Name, c.SkipInvalid, c.Rejects, c.MaxJSONBytes)
}

// importBars draws a bar per table: rows, rate, ETA.
type importBars struct {
	mu   sync.Mutex
	p    *mpb.Progress
	bars map[string]*mpb.Bar
}

func newImportBars(out io.Writer) *importBars {
	return &importBars{
		p:    mpb.New(mpb.WithOutput(out), mpb.WithWidth(32), mpb.WithRefreshRate(200*time.Millisecond)),
		bars: map[string]*mpb.Bar{},
	}
}

func (v *importBars) update(p importer.Progress) {
	v.mu.Lock()
	defer v.mu.Unlock()
	bar, ok := v.bars[p.Table]
	if !ok {
		bar = v.p.AddBar(max(p.Total, 1),
			mpb.PrependDecorators(decor.Name(fmt.Sprintf("%s (%s)", p.Table, p.Entity), decor.WCSyncSpaceR)),
			mpb.AppendDecorators(
				decor.CountersNoUnit("%d/%d rows", decor.WCSyncSpace),
				decor.AverageSpeed(0, "  %.0f rows/s", decor.WCSyncSpace),
				decor.OnComplete(decor.AverageETA(decor.ET_STYLE_GO, decor.WCSyncSpace), "  done"),
			))
		v.bars[p.Table] = bar
	}
	bar.SetTotal(max(p.Total, p.Copied+p.Rejected, 1), false)
	bar.SetCurrent(p.Copied + p.Rejected)
	if p.Done {
		bar.SetTotal(-1, true)
	}
}

func (v *importBars) done(ok bool) {
	v.mu.Lock()
	for _, b := range v.bars {
		if !b.Completed() {
			b.Abort(false)
		}
	}
	v.mu.Unlock()
	v.p.Wait()
}

type importVerifyCmd struct {
	importSource
	importTarget
	MaxJSONBytes int `name:"max-json-bytes" help:"Largest JSON value accepted (the servers' --max-json-bytes)." default:"65536"`
}

func (c importVerifyCmd) Run(g *globals) error {
	m, err := c.load()
	if err != nil {
		return err
	}
	ctx, cancel := signalContext()
	defer cancel()
	cl, err := c.open(ctx, 4)
	if err != nil {
		return err
	}
	defer cl.Close()
	rep, err := importer.Verify(ctx, cl, m, c.From, importer.VerifyOptions{MaxJSONBytes: c.MaxJSONBytes})
	if err != nil {
		return err
	}
	if err := printVerify(g, rep); err != nil {
		return err
	}
	if !rep.OK {
		return errors.New("verify found differences (see above)")
	}
	return nil
}

func printVerify(g *globals, rep *importer.VerifyReport) error {
	if g.JSON {
		enc := json.NewEncoder(g.out)
		enc.SetIndent("", "  ")
		return enc.Encode(rep)
	}
	w := g.table("TABLE", "ENTITY", "ROWS", "MATCHED", "MISSING", "DIFFERENT", "SOURCE HASH", "SHARDGATE HASH")
	for _, t := range rep.Tables {
		fmt.Fprintf(w, "%s\t%s\t%d\t%d\t%d\t%d\t%s\t%s\n", t.Name, t.Entity, t.Rows, t.Matched, t.Missing, t.Different, t.SourceHash, t.TargetHash)
	}
	w.Flush()
	for _, t := range rep.Tables {
		for _, d := range t.Diffs {
			fmt.Fprintf(g.out, "%s: %s\n", t.Name, d)
		}
	}
	for e, n := range rep.Extra {
		fmt.Fprintf(g.out, "Shardgate holds %d %s rows in the import's key space the source does not map (deleted at the source and not followed, or written through the API)\n", n, e)
	}
	sc := rep.Scope
	if sc.UsersChecked {
		fmt.Fprintf(g.out, "extra rows counted among users whose ID starts with %q and their items in collections %s", sc.UserPrefix, strings.Join(sc.Collections, ", "))
	} else {
		fmt.Fprint(g.out, "extra users and items not checked: the mapped user IDs share no prefix")
	}
	if len(sc.Namespaces) > 0 {
		fmt.Fprintf(g.out, "; config in namespaces %s", strings.Join(sc.Namespaces, ", "))
	}
	fmt.Fprintln(g.out)
	if rep.OK {
		fmt.Fprintln(g.out, "\nverified: every mapped row of the source is in Shardgate, as mapped")
	}
	return nil
}

type importCancelCmd struct {
	importTarget
	From       string `help:"Source database DSN of an import from a database (its slot and publication are dropped)." env:"SHARDGATE_IMPORT_FROM"`
	Mapping    string `type:"existingfile" help:"Mapping file, needed with --purge for an import from a database."`
	FromNDJSON string `name:"from-ndjson" type:"existingdir" help:"Export directory of a load of an export, needed with --purge."`
	Purge      bool   `help:"Also delete from Shardgate every row the source's rows map to (or, for a load of an export, every row the export holds)."`
}

func (c importCancelCmd) Run(g *globals) error {
	var m *importer.Mapping
	if c.Purge && c.FromNDJSON == "" {
		if c.Mapping == "" {
			return errors.New("--purge needs --mapping (an import from a database) or --from-ndjson (a load of an export)")
		}
		var err error
		if m, err = (importSource{Mapping: c.Mapping}).load(); err != nil {
			return err
		}
	}
	ctx, cancel := signalContext()
	defer cancel()
	cl, err := c.open(ctx, 4)
	if err != nil {
		return err
	}
	defer cl.Close()
	res, err := importer.Cancel(ctx, cl, c.Name, importer.CancelOptions{SourceDSN: c.From, Mapping: m, ExportDir: c.FromNDJSON, Purge: c.Purge})
	if err != nil {
		return err
	}
	if g.JSON {
		return json.NewEncoder(g.out).Encode(res)
	}
	fmt.Fprintf(g.out, "import %s cancelled: checkpoints removed", c.Name)
	if c.From != "" {
		fmt.Fprintf(g.out, ", slot dropped %v", res.SlotDropped)
	}
	if c.Purge {
		fmt.Fprintf(g.out, ", purged %d users, %d items, %d config values", res.Purged[importer.EntityUser], res.Purged[importer.EntityItem], res.Purged[importer.EntityConfig])
	}
	fmt.Fprintln(g.out)
	return nil
}

type importFollowCmd struct {
	importSource
	importTarget
	SkipInvalid  bool   `name:"skip-invalid" help:"Write changes that do not map to a valid entity to --rejects instead of stopping."`
	Rejects      string `help:"File rejected changes are appended to (NDJSON), with --skip-invalid."`
	MaxJSONBytes int    `name:"max-json-bytes" help:"Largest JSON value accepted (the servers' --max-json-bytes)." default:"65536"`
}

func (c importFollowCmd) Run(g *globals) error {
	m, err := c.load()
	if err != nil {
		return err
	}
	if c.SkipInvalid != (c.Rejects != "") {
		return errors.New("--skip-invalid and --rejects FILE go together")
	}
	ctx, cancel := signalContext()
	defer cancel()
	cl, err := c.open(ctx, 4)
	if err != nil {
		return err
	}
	defer cl.Close()
	return runFollow(ctx, g, cl, m, c.From, c.Name, c.SkipInvalid, c.Rejects, c.MaxJSONBytes)
}

// runFollow applies the source's changes until interrupted or cut over.
func runFollow(ctx context.Context, g *globals, cl *importer.Cluster, m *importer.Mapping, from, name string, skip bool, rejects string, maxJSON int) error {
	opts := importer.FollowOptions{SkipInvalid: skip, MaxJSONBytes: maxJSON}
	if rejects != "" {
		f, err := os.OpenFile(rejects, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
		if err != nil {
			return err
		}
		defer f.Close()
		opts.Rejects = f
	}
	if !g.JSON {
		fmt.Fprintf(g.out, "following the source's changes for import %s; 'shardctl import status' shows the lag, Ctrl-C stops (run again to continue)\n", name)
	}
	if err := importer.Follow(ctx, cl, m, from, name, opts); err != nil {
		return err
	}
	rec, _, err := cl.Catalog.GetImport(context.Background(), name)
	if err == nil && !g.JSON {
		fmt.Fprintf(g.out, "stopped at %s (import %s)\n", rec.AppliedLSN, rec.State)
	}
	return nil
}

type importStatusCmd struct {
	importTarget
	From string `help:"Source database DSN, for the lag." env:"SHARDGATE_IMPORT_FROM"`
}

func (c importStatusCmd) Run(g *globals) error {
	ctx, cancel := signalContext()
	defer cancel()
	cl, err := c.open(ctx, 1)
	if err != nil {
		return err
	}
	defer cl.Close()
	st, err := importer.GetStatus(ctx, cl, c.From, c.Name)
	if err != nil {
		return err
	}
	if g.JSON {
		enc := json.NewEncoder(g.out)
		enc.SetIndent("", "  ")
		return enc.Encode(st)
	}
	fmt.Fprintf(g.out, "import %s: %s, slot %s (active %v), applied %s, source at %s, slot lag %s",
		st.Name, st.State, st.Slot, st.SlotActive, dash(st.AppliedLSN), dash(st.SourceLSN), bytesText(st.LagBytes))
	if st.Heartbeat > 0 {
		fmt.Fprintf(g.out, ", follower last seen %s ago", st.Heartbeat.Round(time.Millisecond))
	}
	fmt.Fprintln(g.out)
	if st.Error != "" {
		fmt.Fprintf(g.out, "last error: %s\n", st.Error)
	}
	fmt.Fprintln(g.out)
	w := g.table("TABLE", "COPIED", "TOTAL", "REJECTED", "BULK", "INSERTS", "UPDATES", "DELETES", "PENDING BYTES", "PENDING SECONDS")
	for _, t := range st.Tables {
		bulk := "copying"
		if t.Done {
			bulk = "done"
		}
		lagB, lagS := "-", "-"
		if t.Pending {
			lagB, lagS = bytesText(t.LagBytes), fmt.Sprintf("%.1f", t.LagSeconds)
		}
		fmt.Fprintf(w, "%s\t%d\t%d\t%d\t%s\t%d\t%d\t%d\t%s\t%s\n", t.Name, t.Copied, t.Total, t.Rejected, bulk,
			t.Inserts, t.Updates, t.Deletes, lagB, lagS)
	}
	if err := w.Flush(); err != nil {
		return err
	}
	fmt.Fprintln(g.out, "\nslot lag: source WAL not yet applied, for all tables (which tables it touches is known only once decoded);\npending: a table's oldest change received and not yet applied (WAL since, seconds since it committed)")
	return nil
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

type importCutoverCmd struct {
	importSource
	importTarget
	MaxWait      time.Duration `name:"max-wait" help:"Longest wait for zero lag." default:"5m"`
	MaxJSONBytes int           `name:"max-json-bytes" help:"Largest JSON value accepted (the servers' --max-json-bytes)." default:"65536"`
}

func (c importCutoverCmd) Run(g *globals) error {
	m, err := c.load()
	if err != nil {
		return err
	}
	ctx, cancel := signalContext()
	defer cancel()
	cl, err := c.open(ctx, 4)
	if err != nil {
		return err
	}
	defer cl.Close()
	if !g.JSON {
		fmt.Fprintln(g.out, "waiting for zero lag (writes to the source must have stopped)...")
	}
	res, err := importer.Cutover(ctx, cl, m, c.From, c.Name, importer.CutoverOptions{Timeout: c.MaxWait,
		Verify: importer.VerifyOptions{MaxJSONBytes: c.MaxJSONBytes}})
	if res != nil && res.Verify != nil && !g.JSON {
		printVerify(g, res.Verify)
	}
	if err != nil {
		return err
	}
	if g.JSON {
		return json.NewEncoder(g.out).Encode(res)
	}
	fmt.Fprintf(g.out, "\ncut over at %s (lag reached zero after %s); following stopped, slot and publication dropped.\nNext:\n",
		res.AppliedLSN, res.Waited.Round(time.Millisecond))
	for i, s := range res.Steps {
		fmt.Fprintf(g.out, "  %d. %s\n", i+1, s)
	}
	return nil
}

func (c importStartCmd) runNDJSON(g *globals) error {
	ctx, cancel := signalContext()
	defer cancel()
	cl, err := c.open(ctx, int32(c.Parallel)+1)
	if err != nil {
		return err
	}
	defer cl.Close()
	start := time.Now()
	res, err := importer.ImportNDJSON(ctx, cl, c.FromNDJSON, importer.NDJSONOptions{
		Name: c.Name, BatchRows: c.BatchRows, Parallel: c.Parallel * max(1, len(cl.Shards())), Events: c.Events})
	if err != nil {
		return err
	}
	took := time.Since(start)
	if g.JSON {
		return json.NewEncoder(g.out).Encode(map[string]any{"users": res.Users, "items": res.Items, "config": res.Config,
			"written": res.Written, "resumed": res.Resumed, "seconds": took.Seconds()})
	}
	resumed := ""
	if res.Resumed {
		resumed = ", continuing an interrupted load"
	}
	fmt.Fprintf(g.out, "loaded %d users, %d items, %d config values (%d written, the rest already as exported%s) in %s\n",
		res.Users, res.Items, res.Config, res.Written, resumed, took.Round(time.Millisecond))
	return nil
}
