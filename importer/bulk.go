package importer

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"regexp"
	"strings"
	"sync"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgtype"
	"golang.org/x/sync/errgroup"

	"github.com/shardgate/shardgate/catalog"
	"github.com/shardgate/shardgate/router"
	"github.com/shardgate/shardgate/shards"
)

// Options tunes an import. The zero value (with a Name) works.
type Options struct {
	// Name names the import in the catalog; default "default".
	Name string
	// Parallel is the number of batches written at once per shard; default 2.
	Parallel int
	// Readers is the number of connections that read each table from the
	// source at once, each a range of its keys, all in one snapshot;
	// default 2. Reading was the bulk phase's bottleneck with one.
	Readers int
	// BatchRows is the rows of one batch to one shard; default 5000.
	BatchRows int
	// Events writes a change event for every row written (off: imported
	// rows publish nothing; config always does, see catalog.ImportConfig).
	Events bool
	// SkipInvalid counts rows that do not map to a valid entity (and items
	// whose user does not exist) and writes them to Rejects instead of
	// stopping the import.
	SkipInvalid bool
	Rejects     io.Writer // NDJSON, one object per rejected row
	// MaxJSONBytes is the largest JSON value accepted; default the server's.
	MaxJSONBytes int
	// Progress, if set, is called (from several goroutines) as tables advance.
	Progress func(Progress)
}

func (o *Options) defaults() {
	if o.Name == "" {
		o.Name = "default"
	}
	if o.Parallel <= 0 {
		o.Parallel = 2
	}
	if o.BatchRows <= 0 {
		o.BatchRows = 5000
	}
	if o.Readers <= 0 {
		o.Readers = 2
	}
	if o.MaxJSONBytes <= 0 {
		o.MaxJSONBytes = DefaultMaxJSONBytes
	}
}

// Progress is a table's state during the bulk phase.
type Progress struct {
	Table    string `json:"table"`
	Entity   Entity `json:"entity"`
	Copied   int64  `json:"copied"`
	Rejected int64  `json:"rejected"`
	Total    int64  `json:"total"`
	Done     bool   `json:"done"`
}

var importNameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9_]{0,30}$`)

// MappingHash identifies a mapping's content: a resumed import must use
// the mapping it started with.
func MappingHash(m *Mapping) string {
	b, _ := json.Marshal(m)
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// sourceID names the source database without its DSN.
func sourceID(ctx context.Context, q querier) (string, error) {
	var sys int64
	var db string
	if err := q.QueryRow(ctx, `SELECT system_identifier, current_database() FROM pg_control_system()`).Scan(&sys, &db); err != nil {
		return "", fmt.Errorf("source: %w", err)
	}
	return fmt.Sprintf("%d/%s", sys, db), nil
}

// replicationConn opens a logical replication connection to the source.
func replicationConn(ctx context.Context, dsn string) (*pgconn.PgConn, error) {
	cfg, err := pgconn.ParseConfig(dsn)
	if err != nil {
		return nil, fmt.Errorf("source DSN: %w", err)
	}
	cfg.RuntimeParams["replication"] = "database"
	cfg.RuntimeParams["timezone"] = "UTC"
	conn, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("source replication connection: %w", err)
	}
	return conn, nil
}

// Start runs (or resumes) the bulk phase of the import opts.Name: it copies
// every mapped row of a consistent snapshot of the source to the shards and
// leaves the import in state following, with a logical replication slot on
// the source created at that snapshot, from which Follow continues. Killed
// at any point, Start run again continues from the catalog's checkpoints:
// the rest is read from a new snapshot, and Follow replays every change
// since the first one, so nothing is missed; rows written twice are written
// unchanged (same version, no event), so nothing is doubled.
func Start(ctx context.Context, cl *Cluster, m *Mapping, sourceDSN string, opts Options) error {
	opts.defaults()
	if !importNameRE.MatchString(opts.Name) {
		return fmt.Errorf("import name %q: want 1-31 characters of [a-z0-9_]", opts.Name)
	}
	if opts.SkipInvalid && opts.Rejects == nil {
		return errors.New("skipping invalid rows needs a rejects file")
	}
	release, err := cl.Catalog.LockImport(ctx, opts.Name)
	if err != nil {
		return err
	}
	defer release()
	hash := MappingHash(m)
	src, err := connectSource(ctx, sourceDSN)
	if err != nil {
		return fmt.Errorf("source: %w", err)
	}
	defer src.Close(context.Background())
	sid, err := sourceID(ctx, src)
	if err != nil {
		return err
	}

	rec, progress, err := cl.Catalog.GetImport(ctx, opts.Name)
	switch {
	case errors.Is(err, catalog.ErrNoImport) || err == nil && (rec.State == catalog.ImportCancelled || rec.State == catalog.ImportCutOver):
		rec = catalog.ImportRecord{
			Name: opts.Name, MappingHash: hash, SourceID: sid, Events: opts.Events,
			Publication: "sg_import_" + opts.Name, Slot: "sg_import_" + opts.Name + "_" + randomHex(4),
		}
		names := make([]string, len(m.Tables))
		for i, t := range m.Tables {
			names[i] = t.Name
		}
		if err := cl.Catalog.CreateImport(ctx, rec, names); err != nil {
			return err
		}
		if rec, progress, err = cl.Catalog.GetImport(ctx, opts.Name); err != nil {
			return err
		}
	case err != nil:
		return err
	case rec.MappingHash != hash:
		return fmt.Errorf("import %s was started with another mapping; finish it with that mapping or 'shardctl import cancel'", opts.Name)
	case rec.SourceID != sid:
		return fmt.Errorf("import %s was started from another source database (%s); this one is %s", opts.Name, rec.SourceID, sid)
	case rec.State == catalog.ImportFollowing:
		return nil // the bulk phase is over
	}
	opts.Events = rec.Events

	tables := make([]*sourceTable, len(m.Tables))
	for i := range m.Tables {
		if tables[i], err = describe(ctx, src, &m.Tables[i]); err != nil {
			return err
		}
	}

	// Readers: opts.Readers transactions per table, all on one snapshot:
	// the slot's, the first time, so that following from the slot misses
	// nothing.
	readers := make([][]pgx.Tx, len(tables))
	defer func() {
		for _, txs := range readers {
			for _, tx := range txs {
				tx.Rollback(context.Background())
				tx.Conn().Close(context.Background())
			}
		}
	}()
	snapshot := ""
	if rec.StartLSN == "" {
		lsn, snap, repl, err := createSlot(ctx, src, sourceDSN, rec, tables)
		if err != nil {
			return err
		}
		defer repl.Close(context.Background())
		snapshot = snap
		rec.StartLSN = lsn
	} else if err := slotExists(ctx, src, rec.Slot); err != nil {
		return err
	}
	for i := range tables {
		if progress[i].Done {
			continue
		}
		snap := snapshot
		for range opts.Readers {
			conn, err := connectSource(ctx, sourceDSN)
			if err != nil {
				return fmt.Errorf("source: %w", err)
			}
			tx, err := conn.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly})
			if err != nil {
				conn.Close(context.Background())
				return fmt.Errorf("source: %w", err)
			}
			readers[i] = append(readers[i], tx)
			if snap != "" {
				if _, err := tx.Exec(ctx, "SET TRANSACTION SNAPSHOT "+sqlString(snap)); err != nil {
					return fmt.Errorf("source: import snapshot: %w", err)
				}
			} else if opts.Readers > 1 {
				// A resumed import: the table's readers share a snapshot of
				// their own (Follow replays every change since the slot's).
				if err := tx.QueryRow(ctx, "SELECT pg_export_snapshot()").Scan(&snap); err != nil {
					return fmt.Errorf("source: export snapshot: %w", err)
				}
			}
		}
	}
	if snapshot != "" {
		// Recorded only once every reader holds the snapshot: a start that
		// dies before this begins again with a new slot.
		if err := cl.Catalog.SetImportStart(ctx, rec.Name, rec.StartLSN); err != nil {
			return err
		}
	}

	b := &bulk{cl: cl, opts: opts, name: rec.Name, sems: map[string]chan struct{}{}}
	for _, phase := range [][]Entity{{EntityUser, EntityConfig}, {EntityItem}} {
		g, gctx := errgroup.WithContext(ctx)
		for i, st := range tables {
			if readers[i] == nil || !containsEntity(phase, st.Entity) {
				continue
			}
			run := &tableRun{bulk: b, st: st, copied: progress[i].RowsCopied, rejected: progress[i].RowsRejected, lastKey: progress[i].LastKey}
			txs := readers[i]
			g.Go(func() error { return run.copy(gctx, txs) })
		}
		if err := g.Wait(); err != nil {
			cl.Catalog.SetImportError(context.Background(), rec.Name, err.Error())
			return err
		}
	}
	return cl.Catalog.SetImportState(ctx, rec.Name, catalog.ImportFollowing, "")
}

func containsEntity(list []Entity, e Entity) bool {
	for _, x := range list {
		if x == e {
			return true
		}
	}
	return false
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// createSlot (re)creates the import's publication and slot and returns the
// slot's LSN and exported snapshot, valid while the returned replication
// connection stays open and idle.
func createSlot(ctx context.Context, src *pgx.Conn, dsn string, rec catalog.ImportRecord, tables []*sourceTable) (lsn, snapshot string, repl *pgconn.PgConn, err error) {
	seen := map[string]bool{}
	var idents []string
	for _, st := range tables {
		if !seen[st.ident] {
			seen[st.ident] = true
			idents = append(idents, st.ident)
		}
	}
	pub := pgx.Identifier{rec.Publication}.Sanitize()
	if _, err := src.Exec(ctx, "DROP PUBLICATION IF EXISTS "+pub); err != nil {
		return "", "", nil, fmt.Errorf("source: %w", err)
	}
	if _, err := src.Exec(ctx, "CREATE PUBLICATION "+pub+" FOR TABLE "+strings.Join(idents, ", ")); err != nil {
		return "", "", nil, fmt.Errorf("source: create publication: %w", err)
	}
	// A slot an earlier start made before it could record it.
	if _, err := src.Exec(ctx, `SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1`, rec.Slot); err != nil {
		return "", "", nil, fmt.Errorf("source: drop stale slot: %w", err)
	}
	repl, err = replicationConn(ctx, dsn)
	if err != nil {
		return "", "", nil, err
	}
	res, err := pglogrepl.CreateReplicationSlot(ctx, repl, rec.Slot, "pgoutput",
		pglogrepl.CreateReplicationSlotOptions{SnapshotAction: "EXPORT_SNAPSHOT"})
	if err != nil {
		repl.Close(context.Background())
		return "", "", nil, fmt.Errorf("source: create replication slot: %w", err)
	}
	return res.ConsistentPoint, res.SnapshotName, repl, nil
}

func slotExists(ctx context.Context, src *pgx.Conn, slot string) error {
	var n int
	if err := src.QueryRow(ctx, `SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1`, slot).Scan(&n); err != nil {
		return fmt.Errorf("source: %w", err)
	}
	if n == 0 {
		return fmt.Errorf("the import's replication slot %s is gone from the source: changes since the snapshot are lost; 'shardctl import cancel' and start again", slot)
	}
	return nil
}

// bulk is one run of the bulk phase.
type bulk struct {
	cl   *Cluster
	opts Options
	name string

	mu      sync.Mutex
	sems    map[string]chan struct{} // per shard: batches in flight
	rejects sync.Mutex
}

// sem returns the shard's in-flight limiter.
func (b *bulk) sem(shard string) chan struct{} {
	b.mu.Lock()
	defer b.mu.Unlock()
	s, ok := b.sems[shard]
	if !ok {
		s = make(chan struct{}, b.opts.Parallel)
		b.sems[shard] = s
	}
	return s
}

// reject writes one rejected row to the rejects file.
func (b *bulk) reject(e *RowError) error {
	b.rejects.Lock()
	defer b.rejects.Unlock()
	key := map[string]string{}
	for i, c := range e.KeyCols {
		if i < len(e.Key) {
			key[c] = e.Key[i]
		}
	}
	line, _ := json.Marshal(map[string]any{"table": e.Table, "key": key, "field": e.Field, "error": e.Msg})
	_, err := b.opts.Rejects.Write(append(line, '\n'))
	return err
}

// tableRun copies one table: its rest after the checkpoint, cut into key
// ranges read at once.
type tableRun struct {
	*bulk
	st *sourceTable

	mu       sync.Mutex
	ranges   []*keyRange // in key order
	head     int         // the first range the checkpoint has not passed
	copied   int64       // checkpointed
	rejected int64
	lastKey  []string
	written  int64 // rows written, checkpointed or not (for progress)
	total    int64
}

// keyRange is one reader's part of a table.
type keyRange struct {
	chunks []*chunk // in flight, in read order
	read   bool     // its reader has dispatched its last chunk
}

// chunk is a run of source rows, written as one batch per shard; the
// checkpoint passes it once it and every chunk before it (in its range and
// in the ranges before) are written.
type chunk struct {
	lastKey  []string
	rows     int64
	rejected int64
	pending  int
}

func (r *tableRun) report(done bool) {
	if r.opts.Progress != nil {
		r.opts.Progress(Progress{Table: r.st.Name, Entity: r.st.Entity, Copied: r.written, Rejected: r.rejected, Total: r.total, Done: done})
	}
}

func keyArgs(key []string) []any {
	args := make([]any, len(key))
	for i, k := range key {
		args[i] = k
	}
	return args
}

func (r *tableRun) copy(ctx context.Context, txs []pgx.Tx) error {
	tx := txs[0]
	if err := tx.QueryRow(ctx, r.st.countSQL()).Scan(&r.total); err != nil {
		return fmt.Errorf("table %s: count: %w", r.st.Name, err)
	}
	r.total += r.copied + r.rejected // rows before the checkpoint were counted then
	rest := r.total
	if r.lastKey != nil {
		// Rows after the checkpoint only.
		q := strings.Replace(r.st.selectSQL(true), "SELECT ", "SELECT count(*) FROM (SELECT ", 1) + ") AS rest"
		if err := tx.QueryRow(ctx, q, keyArgs(r.lastKey)...).Scan(&rest); err != nil {
			return fmt.Errorf("table %s: count: %w", r.st.Name, err)
		}
		r.total = r.copied + r.rejected + rest
	}
	r.written = r.copied
	if err := r.Catalog().SetImportTableTotal(ctx, r.name, r.st.Name, r.total); err != nil {
		return err
	}
	r.report(false)

	// Cut the rest into one range per reader (small tables: one range).
	var cuts [][]string
	if n := int64(len(txs)); n > 1 && rest >= 2*int64(r.opts.BatchRows) {
		step := (rest + n - 1) / n
		args := append(keyArgs(r.lastKey), step, n-1)
		rows, err := tx.Query(ctx, r.st.splitSQL(r.lastKey != nil), args...)
		if err != nil {
			return fmt.Errorf("table %s: split: %w", r.st.Name, err)
		}
		cuts, err = pgx.CollectRows(rows, func(row pgx.CollectableRow) ([]string, error) {
			vals := make([]pgtype.Text, len(r.st.PrimaryKey))
			ptrs := make([]any, len(vals))
			for i := range vals {
				ptrs[i] = &vals[i]
			}
			if err := row.Scan(ptrs...); err != nil {
				return nil, err
			}
			key := make([]string, len(vals))
			for i, v := range vals {
				key[i] = v.String
			}
			return key, nil
		})
		if err != nil {
			return fmt.Errorf("table %s: split: %w", r.st.Name, err)
		}
	}
	r.ranges = make([]*keyRange, len(cuts)+1)
	for i := range r.ranges {
		r.ranges[i] = &keyRange{}
	}
	g, gctx := errgroup.WithContext(ctx)
	for i := range r.ranges {
		lower, upper := r.lastKey, []string(nil)
		if i > 0 {
			lower = cuts[i-1]
		}
		if i < len(cuts) {
			upper = cuts[i]
		}
		g.Go(func() error { return r.readRange(gctx, g, txs[i], i, lower, upper) })
	}
	if err := g.Wait(); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := r.Catalog().CheckpointImportTable(ctx, r.name, r.st.Name, r.lastKey, r.copied, r.rejected, true); err != nil {
		return err
	}
	r.report(true)
	return nil
}

// readRange reads the table's rows after lower up to upper (nil: no bound)
// and dispatches them as range i's chunks.
func (r *tableRun) readRange(ctx context.Context, g *errgroup.Group, tx pgx.Tx, i int, lower, upper []string) error {
	rows, err := tx.Query(ctx, r.st.selectRangeSQL(lower != nil, upper != nil), append(keyArgs(lower), keyArgs(upper)...)...)
	if err != nil {
		return fmt.Errorf("table %s: read: %w", r.st.Name, err)
	}
	defer rows.Close()
	chunkRows := r.opts.BatchRows * max(1, len(r.cl.Table().Shards()))
	var (
		cur  = &chunk{}
		recs = make([]Record, 0, chunkRows) // at its size: growing it by append was a tenth of the importer's CPU
	)
	flush := func() {
		c, batch := cur, recs
		cur, recs = &chunk{}, make([]Record, 0, chunkRows)
		r.dispatch(ctx, g, i, c, batch)
	}
	partitions := r.cl.Partitions()
	for rows.Next() {
		rec, bad := r.st.scanRecord(rows, r.opts.MaxJSONBytes)
		if bad != nil {
			if !r.opts.SkipInvalid {
				return bad
			}
			if err := r.reject(bad); err != nil {
				return err
			}
			cur.rejected++
			cur.lastKey = bad.Key
			continue
		}
		if r.st.Entity != EntityConfig {
			rec.Partition = router.Partition(rec.UserID, partitions)
		}
		cur.lastKey = rec.Key
		recs = append(recs, rec)
		if len(recs) >= chunkRows {
			flush()
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return fmt.Errorf("table %s: read: %w", r.st.Name, err)
	}
	if len(recs) > 0 || cur.rejected > 0 {
		flush()
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.ranges[i].read = true
	return r.advance(ctx)
}

func (r *tableRun) Catalog() *catalog.Catalog { return r.cl.Catalog }

// dispatch writes a chunk of range i: one batch per shard, each in its
// own goroutine once the shard has room.
func (r *tableRun) dispatch(ctx context.Context, g *errgroup.Group, i int, c *chunk, recs []Record) {
	groups := map[string][]Record{}
	if r.st.Entity == EntityConfig {
		groups[""] = recs
	} else {
		t := r.cl.Table()
		per := len(recs)/max(1, len(t.Shards())) + len(recs)/8 // room for an uneven spread
		for _, rec := range recs {
			o := t.Owner(rec.Partition)
			if groups[o] == nil {
				groups[o] = make([]Record, 0, per)
			}
			groups[o] = append(groups[o], rec)
		}
	}
	c.rows = int64(len(recs))
	r.mu.Lock()
	c.pending = len(groups)
	r.ranges[i].chunks = append(r.ranges[i].chunks, c)
	r.mu.Unlock()
	if len(groups) == 0 {
		g.Go(func() error { return r.finish(ctx, c, 0, 0) })
		return
	}
	for shard, batch := range groups {
		sem := r.sem(shard)
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			return
		}
		g.Go(func() error {
			defer func() { <-sem }()
			missing, err := r.write(ctx, batch)
			if err != nil {
				return err
			}
			return r.finish(ctx, c, int64(len(batch)), missing)
		})
	}
}

// finish marks one batch of c (n rows) written, missing of them rejected,
// and moves the checkpoint past every chunk now complete.
func (r *tableRun) finish(ctx context.Context, c *chunk, n, missing int64) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	c.pending--
	c.rows -= missing
	c.rejected += missing
	r.written += n - missing
	return r.advance(ctx)
}

// advance moves the checkpoint past the complete chunks at its head, in
// key order, and records it. r.mu is held.
func (r *tableRun) advance(ctx context.Context) error {
	advanced := false
	for r.head < len(r.ranges) {
		kr := r.ranges[r.head]
		for len(kr.chunks) > 0 && kr.chunks[0].pending == 0 {
			done := kr.chunks[0]
			kr.chunks = kr.chunks[1:]
			r.copied += done.rows
			r.rejected += done.rejected
			if done.lastKey != nil {
				r.lastKey = done.lastKey
			}
			advanced = true
		}
		if len(kr.chunks) > 0 || !kr.read {
			break
		}
		r.head++
	}
	if !advanced {
		return nil
	}
	if err := r.Catalog().CheckpointImportTable(ctx, r.name, r.st.Name, r.lastKey, r.copied, r.rejected, false); err != nil {
		return err
	}
	r.report(false)
	return nil
}

// write writes recs wherever their partitions are owned now, following
// moves, and returns how many it rejected for a missing user.
func (r *tableRun) write(ctx context.Context, recs []Record) (missing int64, err error) {
	if r.st.Entity == EntityConfig {
		entries := make([]catalog.ImportConfigEntry, len(recs))
		for i, rec := range recs {
			entries[i] = catalog.ImportConfigEntry{Namespace: rec.Namespace, Key: rec.ItemKey, Value: []byte(rec.JSON)}
		}
		_, err := r.Catalog().ImportConfig(ctx, entries)
		return 0, err
	}
	err = r.cl.route(ctx, recs, func(sh *shards.Shard, batch []Record) error {
		n, err := r.writeShard(ctx, sh, batch)
		missing += n
		return err
	})
	return missing, err
}

func (r *tableRun) writeShard(ctx context.Context, sh *shards.Shard, recs []Record) (missing int64, err error) {
	if r.st.Entity == EntityUser {
		rows := make([]shards.ImportUser, len(recs))
		for i, rec := range recs {
			rows[i] = shards.ImportUser{Partition: rec.Partition, UserID: rec.UserID, Profile: []byte(rec.JSON)}
		}
		_, err := sh.ImportUsers(ctx, rows, r.opts.Events)
		return 0, err
	}
	rows := make([]shards.ImportItem, len(recs))
	for i, rec := range recs {
		rows[i] = shards.ImportItem{Partition: rec.Partition, UserID: rec.UserID, Collection: rec.Collection, Key: rec.ItemKey, Value: []byte(rec.JSON)}
	}
	res, err := sh.ImportItems(ctx, rows, r.opts.Events, r.opts.SkipInvalid)
	var mu *shards.MissingUsersError
	if errors.As(err, &mu) {
		// Name the first source row whose user is missing.
		for _, rec := range recs {
			if rec.UserID == mu.Users[0].UserID {
				return 0, &RowError{Table: r.st.Name, KeyCols: r.st.PrimaryKey, Key: rec.Key, Field: "user_id",
					Msg: fmt.Sprintf("user %q does not exist in Shardgate (%d users of this batch are missing)", rec.UserID, len(mu.Users))}
			}
		}
		return 0, err
	}
	if err != nil || len(res.MissingUsers) == 0 {
		return 0, err
	}
	gone := map[string]bool{}
	for _, u := range res.MissingUsers {
		gone[u.UserID] = true
	}
	for _, rec := range recs {
		if gone[rec.UserID] {
			missing++
			if err := r.reject(&RowError{Table: r.st.Name, KeyCols: r.st.PrimaryKey, Key: rec.Key, Field: "user_id",
				Msg: fmt.Sprintf("user %q does not exist in Shardgate", rec.UserID)}); err != nil {
				return missing, err
			}
		}
	}
	return missing, nil
}
