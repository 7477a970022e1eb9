package importer

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/jackc/pgx/v5/pgtype"
	"golang.org/x/sync/errgroup"

	"github.com/shardgate/shardgate/catalog"
	"github.com/shardgate/shardgate/internal/versioning"
	"github.com/shardgate/shardgate/router"
	"github.com/shardgate/shardgate/shards"
)

// FollowOptions tunes Follow.
type FollowOptions struct {
	MaxJSONBytes int // 0: DefaultMaxJSONBytes
	// SkipInvalid writes changes that do not map to a valid entity to
	// Rejects instead of stopping.
	SkipInvalid bool
	Rejects     io.Writer
	// RecordEvery is how often progress is written to the catalog (and the
	// import's state checked); default 200ms.
	RecordEvery time.Duration
	// MaxBatchWait bounds how long a received change waits for more to be
	// applied with it; default 10ms. Changes are applied as soon as the
	// stream pauses, or once the oldest has waited this long.
	MaxBatchWait time.Duration
	// OnApply, if set, is called after each change is applied with the time
	// since its transaction committed on the source.
	OnApply func(table string, lag time.Duration)
}

// ErrNotFollowing means the import is not in its follow phase.
var ErrNotFollowing = errors.New("the import is not following (run 'shardctl import start' first)")

// Follow applies the source's changes since the bulk phase's snapshot,
// read from the import's slot by logical decoding (pgoutput), through the
// same mapping: inserts and updates write the mapped entity (with change
// events, as any write), deletes delete it. It returns when ctx ends (nil)
// or when the import leaves the follow phase (cutover or cancel). Stopped
// and started again, it continues from the last position it confirmed:
// changes after it are applied again, which converges to the same state.
func Follow(ctx context.Context, cl *Cluster, m *Mapping, sourceDSN, name string, opts FollowOptions) error {
	if opts.MaxJSONBytes <= 0 {
		opts.MaxJSONBytes = DefaultMaxJSONBytes
	}
	if opts.RecordEvery <= 0 {
		opts.RecordEvery = 200 * time.Millisecond
	}
	if opts.MaxBatchWait <= 0 {
		opts.MaxBatchWait = 10 * time.Millisecond
	}
	if opts.SkipInvalid && opts.Rejects == nil {
		return errors.New("skipping invalid changes needs a rejects file")
	}
	release, err := cl.Catalog.LockImport(ctx, name)
	if err != nil {
		return err
	}
	defer release()
	rec, _, err := cl.Catalog.GetImport(ctx, name)
	if err != nil {
		return err
	}
	if rec.State != catalog.ImportFollowing {
		return fmt.Errorf("import %s is %s: %w", name, rec.State, ErrNotFollowing)
	}
	if rec.MappingHash != MappingHash(m) {
		return fmt.Errorf("import %s was started with another mapping", name)
	}
	src, err := connectSource(ctx, sourceDSN)
	if err != nil {
		return err
	}
	defer src.Close(context.Background())
	f := &follower{cl: cl, opts: opts, name: name, src: src, byRel: map[string][]*sourceTable{},
		rels: map[uint32]*pglogrepl.RelationMessage{}, stats: map[string]*catalog.FollowTableProgress{},
		bulk: &bulk{opts: Options{Rejects: opts.Rejects}}, events: rec.Events}
	for i := range m.Tables {
		st, err := describe(ctx, src, &m.Tables[i])
		if err != nil {
			return err
		}
		rel := st.schema + "." + st.relname
		f.byRel[rel] = append(f.byRel[rel], st)
		f.stats[st.Name] = &catalog.FollowTableProgress{Name: st.Name}
	}
	start := rec.AppliedLSN
	if start == "" {
		start = rec.StartLSN
	}
	if f.applied, err = pglogrepl.ParseLSN(start); err != nil {
		return fmt.Errorf("import %s: position %q: %w", name, start, err)
	}
	f.warm(ctx)
	repl, err := replicationConn(ctx, sourceDSN)
	if err != nil {
		return err
	}
	defer repl.Close(context.Background())
	err = pglogrepl.StartReplication(ctx, repl, rec.Slot, f.applied, pglogrepl.StartReplicationOptions{
		PluginArgs: []string{"proto_version '1'", "publication_names " + sqlString(rec.Publication)}})
	if err != nil {
		return fmt.Errorf("source: start replication from slot %s: %w", rec.Slot, err)
	}
	if err := f.run(ctx, repl); err != nil && ctx.Err() == nil {
		return err
	}
	// Stopped (ctx ended): whatever failed for it, what is recorded is
	// applied, so a new follower continues from there.
	return nil
}

type follower struct {
	cl    *Cluster
	opts  FollowOptions
	name  string
	src   *pgx.Conn
	byRel map[string][]*sourceTable
	rels  map[uint32]*pglogrepl.RelationMessage
	stats map[string]*catalog.FollowTableProgress
	bulk  *bulk // for its rejects writer
	// events: the import's --events, recorded when it started: applied
	// changes write change events only with it.
	events bool

	applied    pglogrepl.LSN // every change up to here is applied
	committed  pglogrepl.LSN // the end of the last transaction received
	inTx       bool
	commitTime time.Time
	pending    []pendingChange
	pendingAt  time.Time // when the first pending change was received
}

func (f *follower) run(ctx context.Context, repl *pgconn.PgConn) error {
	const standbyEvery = time.Second
	nextStandby := time.Now().Add(standbyEvery)
	nextRecord := time.Now().Add(f.opts.RecordEvery)
	for {
		if ctx.Err() != nil {
			f.record(context.Background())
			return nil
		}
		now := time.Now()
		if !now.Before(nextRecord) {
			stop, err := f.record(ctx)
			if err != nil || stop {
				return err
			}
			nextRecord = now.Add(f.opts.RecordEvery)
		}
		if !now.Before(nextStandby) {
			if err := f.confirm(ctx, repl); err != nil {
				return err
			}
			nextStandby = now.Add(standbyEvery)
		}
		deadline := nextRecord
		if nextStandby.Before(deadline) {
			deadline = nextStandby
		}
		if len(f.pending) > 0 {
			// Apply as soon as the stream pauses, or the batch is old.
			deadline = now.Add(2 * time.Millisecond)
			if full := f.pendingAt.Add(f.opts.MaxBatchWait); full.Before(deadline) {
				deadline = full
			}
		}
		rctx, cancel := context.WithDeadline(ctx, deadline)
		raw, err := repl.ReceiveMessage(rctx)
		cancel()
		if err != nil {
			if pgconn.Timeout(err) && ctx.Err() == nil {
				if err := f.flush(ctx); err != nil {
					f.record(context.Background())
					return err
				}
				continue
			}
			if ctx.Err() != nil {
				continue
			}
			return fmt.Errorf("source: receive: %w", err)
		}
		switch msg := raw.(type) {
		case *pgproto3.ErrorResponse:
			return fmt.Errorf("source: replication: %s", msg.Message)
		case *pgproto3.CopyData:
			switch msg.Data[0] {
			case pglogrepl.PrimaryKeepaliveMessageByteID:
				ka, err := pglogrepl.ParsePrimaryKeepaliveMessage(msg.Data[1:])
				if err != nil {
					return fmt.Errorf("source: keepalive: %w", err)
				}
				// Between transactions, everything up to the server's WAL
				// end has been sent and applied.
				if !f.inTx && len(f.pending) == 0 && ka.ServerWALEnd > f.applied {
					f.applied = ka.ServerWALEnd
				}
				if ka.ReplyRequested {
					nextStandby = time.Time{}
				}
			case pglogrepl.XLogDataByteID:
				xld, err := pglogrepl.ParseXLogData(msg.Data[1:])
				if err != nil {
					return fmt.Errorf("source: xlog data: %w", err)
				}
				if err := f.handle(ctx, xld.WALData); err != nil {
					f.record(context.Background())
					return err
				}
				// A stream that never pauses still gets its changes applied
				// within MaxBatchWait (plus the apply).
				if len(f.pending) > 0 && time.Since(f.pendingAt) >= f.opts.MaxBatchWait {
					if err := f.flush(ctx); err != nil {
						f.record(context.Background())
						return err
					}
				}
			}
		}
	}
}

// warm opens the shard connections the first changes are applied
// through, so they do not wait for them (best effort: a shard that does
// not answer is retried by the apply).
func (f *follower) warm(ctx context.Context) {
	var g errgroup.Group
	for _, sh := range f.cl.Shards() {
		for range applyParallel {
			g.Go(func() error { return sh.Ping(ctx) })
		}
	}
	g.Wait()
}

// confirm tells the source what is applied, so the slot releases the WAL
// before it.
func (f *follower) confirm(ctx context.Context, repl *pgconn.PgConn) error {
	if err := pglogrepl.SendStandbyStatusUpdate(ctx, repl, pglogrepl.StandbyStatusUpdate{WALWritePosition: f.applied}); err != nil {
		return fmt.Errorf("source: standby status: %w", err)
	}
	return nil
}

// record writes progress to the catalog and reports whether the import
// left the follow phase.
func (f *follower) record(ctx context.Context) (stop bool, err error) {
	var tables []catalog.FollowTableProgress
	for _, s := range f.stats {
		tables = append(tables, *s)
	}
	if err := f.cl.Catalog.RecordFollow(ctx, f.name, f.applied.String(), time.Now(), tables); err != nil {
		return false, err
	}
	for _, s := range f.stats {
		s.Inserts, s.Updates, s.Deletes = 0, 0, 0
	}
	rec, _, err := f.cl.Catalog.GetImport(ctx, f.name)
	if err != nil {
		return false, err
	}
	return rec.State != catalog.ImportFollowing, nil
}

func (f *follower) handle(ctx context.Context, data []byte) error {
	msg, err := pglogrepl.Parse(data)
	if err != nil {
		return fmt.Errorf("source: decode: %w", err)
	}
	switch m := msg.(type) {
	case *pglogrepl.RelationMessage:
		f.rels[m.RelationID] = m
	case *pglogrepl.BeginMessage:
		f.inTx, f.commitTime = true, m.CommitTime
	case *pglogrepl.CommitMessage:
		f.inTx = false
		f.committed = m.TransactionEndLSN
		if len(f.pending) == 0 {
			f.applied = max(f.applied, f.committed)
		}
	case *pglogrepl.InsertMessage:
		return f.change(ctx, m.RelationID, nil, m.Tuple, 'i')
	case *pglogrepl.UpdateMessage:
		return f.change(ctx, m.RelationID, m.OldTuple, m.NewTuple, 'u')
	case *pglogrepl.DeleteMessage:
		return f.change(ctx, m.RelationID, m.OldTuple, nil, 'd')
	case *pglogrepl.TruncateMessage:
		return f.truncated(ctx, m)
	}
	return nil
}

// ErrTruncated is a TRUNCATE of a mapped table on the source, which the
// follow phase cannot apply: it does not know which of Shardgate's rows
// came from the table (a mapping's rows may share their key space with
// other tables' and with data the cluster held before).
var ErrTruncated = errors.New("a mapped table was truncated on the source")

// truncated applies what came before a TRUNCATE and stops the follower
// with an error that names the tables and says what to do, also recorded
// as the import's error for 'import status'. The follower stops there
// each time it is started again: the TRUNCATE stays in the slot.
func (f *follower) truncated(ctx context.Context, m *pglogrepl.TruncateMessage) error {
	var names []string
	for _, id := range m.RelationIDs {
		if rel, ok := f.rels[id]; ok {
			for _, st := range f.byRel[rel.Namespace+"."+rel.RelationName] {
				names = append(names, fmt.Sprintf("%s.%s (table %s)", rel.Namespace, rel.RelationName, st.Name))
			}
		}
	}
	if len(names) == 0 {
		return nil
	}
	if err := f.flush(ctx); err != nil {
		return err
	}
	err := fmt.Errorf("source: TRUNCATE of %s after %s: %w; the follow phase cannot apply it (which of Shardgate's rows came from the table is not known) and stops here every time. "+
		"Changes before it are applied. To go on, run 'shardctl import cancel' and start the import again; the rows the table had mapped stay in Shardgate "+
		"(a purge deletes what the source's rows map to now) and 'import verify' counts them as extra: delete them through the API, or purge before the TRUNCATE next time",
		strings.Join(names, ", "), f.applied, ErrTruncated)
	f.cl.Catalog.SetImportError(ctx, f.name, err.Error())
	return err
}

// change queues one row change for every mapping of its table; flush
// applies what is queued.
func (f *follower) change(ctx context.Context, relID uint32, old, new *pglogrepl.TupleData, op byte) error {
	rel, ok := f.rels[relID]
	if !ok {
		return fmt.Errorf("source: change for unknown relation %d", relID)
	}
	for _, st := range f.byRel[rel.Namespace+"."+rel.RelationName] {
		s := f.stats[st.Name]
		if s.PendingSince.IsZero() {
			s.PendingSince, s.PendingLSN = f.commitTime, f.applied.String()
		}
		pc := pendingChange{st: st, op: op, commit: f.commitTime}
		if old != nil {
			req := st.evalRequest(rel, old, true)
			pc.old = &req
		}
		if new != nil {
			req := st.evalRequest(rel, new, false)
			pc.new = &req
		}
		if len(f.pending) == 0 {
			f.pendingAt = time.Now()
		}
		f.pending = append(f.pending, pc)
	}
	if len(f.pending) >= maxPending {
		return f.flush(ctx)
	}
	return nil
}

// maxPending bounds the changes applied together.
const maxPending = 2000

// applyParallel is how many users' writes a flush applies at once.
const applyParallel = 16

// pendingChange is a row change received and not yet applied.
type pendingChange struct {
	st       *sourceTable
	op       byte // 'i', 'u', 'd'
	commit   time.Time
	old, new *evalReq
}

// write is one write a change makes in Shardgate.
type write struct {
	st     *sourceTable
	delete bool
	rec    Record
}

// flush applies the queued changes: their mappings are evaluated by the
// source in one round trip, then the writes of different users run in
// parallel, each user's in order (a user before its items, a delete after
// the write before it). Changes up to the last commit received are then
// applied.
func (f *follower) flush(ctx context.Context) error {
	if len(f.pending) == 0 {
		f.applied = max(f.applied, f.committed)
		return nil
	}
	var b pgx.Batch
	for _, pc := range f.pending {
		for _, req := range []*evalReq{pc.old, pc.new} {
			if req != nil {
				b.Queue(req.sql, req.args...)
			}
		}
	}
	br := f.src.SendBatch(ctx, &b)
	groups := map[string][]write{}
	var order []string
	add := func(w write) {
		k := w.rec.UserID
		if w.st.Entity == EntityConfig {
			k = "\x00" + w.rec.Namespace + "\x00" + w.rec.ItemKey
		}
		if _, ok := groups[k]; !ok {
			order = append(order, k)
		}
		groups[k] = append(groups[k], w)
	}
	var evalErr error
	for _, pc := range f.pending {
		var old, new *Record
		var inFilter bool
		for _, req := range []*evalReq{pc.old, pc.new} {
			if req == nil || evalErr != nil {
				continue
			}
			r, in, found, err := f.evalResult(pc.st, br.QueryRow(), req.identity)
			if err != nil {
				var bad *RowError
				if errors.As(err, &bad) && f.opts.SkipInvalid {
					if err := f.bulk.reject(bad); err != nil {
						evalErr = err
					}
					continue
				}
				evalErr = err
				continue
			}
			if !found {
				continue
			}
			if req.identity {
				old = &r
			} else {
				new, inFilter = &r, in
			}
		}
		switch {
		case pc.op == 'd':
			if old != nil {
				add(write{st: pc.st, delete: true, rec: *old})
			}
		case new == nil:
			// Gone from the source since (a TOASTed row read back); its
			// delete follows.
		case !inFilter:
			if pc.op == 'u' {
				add(write{st: pc.st, delete: true, rec: *new}) // it left the filter
			}
		default:
			if old != nil && recordKey(pc.st.Entity, old) != recordKey(pc.st.Entity, new) {
				add(write{st: pc.st, delete: true, rec: *old})
			}
			add(write{st: pc.st, rec: *new})
		}
	}
	if err := br.Close(); evalErr == nil && err != nil {
		evalErr = fmt.Errorf("source: map changes: %w", err)
	}
	if evalErr != nil {
		return evalErr
	}

	// Round r applies the r-th write of every group: each user's (and
	// config key's) writes keep their order, and a round's writes, all of
	// different users, go set-based.
	for r := 0; ; r++ {
		var round []write
		for _, k := range order {
			if ws := groups[k]; r < len(ws) {
				round = append(round, ws[r])
			}
		}
		if len(round) == 0 {
			break
		}
		if err := f.applyRound(ctx, round); err != nil {
			return err
		}
	}
	for _, pc := range f.pending {
		s := f.stats[pc.st.Name]
		switch pc.op {
		case 'i':
			s.Inserts++
		case 'u':
			s.Updates++
		default:
			s.Deletes++
		}
		s.PendingSince, s.PendingLSN = time.Time{}, ""
		if f.opts.OnApply != nil {
			f.opts.OnApply(pc.st.Name, time.Since(pc.commit))
		}
	}
	f.pending = f.pending[:0]
	f.applied = max(f.applied, f.committed)
	return nil
}

// evalSQL evaluates the mapping on a row given as text ($1.. in the
// relation's column order, cast to the columns' types).
func (st *sourceTable) evalSQL(rel *pglogrepl.RelationMessage) string {
	cols := make([]string, len(rel.Columns))
	for i, c := range rel.Columns {
		typ, ok := st.types[c.Name]
		if !ok {
			typ = "text"
		}
		cols[i] = fmt.Sprintf("$%d::text::%s AS %s", i+1, typ, pgx.Identifier{c.Name}.Sanitize())
	}
	return st.evalFrom("(SELECT " + strings.Join(cols, ", ") + ")")
}

// evalFrom selects the key, the fields and whether the row passes the
// mapping's filter from rows given by from.
func (st *sourceTable) evalFrom(from string) string {
	var out []string
	for i, c := range st.PrimaryKey {
		out = append(out, fmt.Sprintf("%s.%s::text AS sg_k%d", st.alias, pgx.Identifier{c}.Sanitize(), i))
	}
	fe := st.fieldExprs()
	for i, e := range fe {
		if i == len(fe)-1 {
			e = "(" + e + ")::text"
		}
		out = append(out, fmt.Sprintf("%s AS sg_f%d", e, i))
	}
	where := "true"
	if st.Where != "" {
		where = "coalesce((" + st.Where + "), false)"
	}
	out = append(out, where+" AS sg_in")
	return fmt.Sprintf("SELECT %s FROM %s AS %s", strings.Join(out, ", "), from, st.alias)
}

// evalReq is the query that maps one decoded row.
type evalReq struct {
	sql      string
	args     []any
	identity bool
}

// evalRequest builds the query that maps a decoded row. With identity,
// only the fields naming the entity will be checked (a delete carries the
// key columns alone).
func (st *sourceTable) evalRequest(rel *pglogrepl.RelationMessage, tup *pglogrepl.TupleData, identity bool) evalReq {
	args := make([]any, len(rel.Columns))
	toast := false
	for i := range rel.Columns {
		if i >= len(tup.Columns) {
			break
		}
		switch c := tup.Columns[i]; c.DataType {
		case pglogrepl.TupleDataTypeText:
			args[i] = string(c.Data)
		case pglogrepl.TupleDataTypeToast:
			toast = true
		}
	}
	if !toast || identity {
		return evalReq{sql: st.evalSQL(rel), args: args, identity: identity}
	}
	// An unchanged TOASTed value is not in the change: read the row as it
	// is now (a later change brings anything newer).
	keyArgs := make([]any, len(st.PrimaryKey))
	conds := make([]string, len(st.PrimaryKey))
	for i, k := range st.PrimaryKey {
		for j, c := range rel.Columns {
			if c.Name == k {
				keyArgs[i] = args[j]
			}
		}
		conds[i] = fmt.Sprintf("%s.%s = $%d::text::%s", st.alias, pgx.Identifier{k}.Sanitize(), i+1, st.keyTypes[i])
	}
	return evalReq{sql: st.evalFrom(st.ident) + " WHERE " + strings.Join(conds, " AND "), args: keyArgs}
}

// evalResult reads what an evalRequest's query returned: the mapped row,
// whether it passes the filter, and whether there was a row at all.
func (f *follower) evalResult(st *sourceTable, row pgx.Row, identity bool) (r Record, in, found bool, err error) {
	nk := len(st.PrimaryKey)
	vals := make([]pgtype.Text, nk+st.fieldCount())
	ptrs := make([]any, len(vals)+1)
	for i := range vals {
		ptrs[i] = &vals[i]
	}
	ptrs[len(vals)] = &in
	err = row.Scan(ptrs...)
	if errors.Is(err, pgx.ErrNoRows) {
		return Record{}, false, false, nil
	}
	if err != nil {
		return Record{}, false, false, fmt.Errorf("table %s: map change: %w", st.Name, err)
	}
	r = Record{Key: make([]string, nk)}
	for i := range nk {
		r.Key[i] = vals[i].String
	}
	var bad *RowError
	switch {
	case identity || !in:
		r, bad = st.mapIdentity(r, vals[nk:])
	default:
		r, bad = st.mapValues(r, vals[nk:], f.opts.MaxJSONBytes)
	}
	if bad != nil {
		return r, false, true, bad
	}
	if st.Entity != EntityConfig {
		r.Partition = router.Partition(r.UserID, f.cl.Partitions())
	}
	return r, in || identity, true, nil
}

// mapIdentity validates only the fields that name the entity.
func (st *sourceTable) mapIdentity(r Record, f []pgtype.Text) (Record, *RowError) {
	last := len(f) - 1
	fake := append([]pgtype.Text(nil), f...)
	fake[last] = pgtype.Text{String: "{}", Valid: true}
	r, bad := st.mapValues(r, fake, DefaultMaxJSONBytes)
	if bad != nil && bad.Msg == "is NULL" {
		bad.Msg += " in a delete: the mapping names the entity with columns the source does not log for deletes (ALTER TABLE " + st.Source + " REPLICA IDENTITY FULL)"
	}
	r.JSON = ""
	if bad == nil && st.Entity != EntityConfig {
		r.Partition = -1
	}
	return r, bad
}

// applyRound applies writes that all concern different users (or config
// keys), so in any order: per shard one batch each of user deletes, user
// upserts, item deletes and item upserts, at once (upserts in one
// statement each: shards.ApplyUsers, ApplyItems), and the config writes.
// Upserts and deletes follow the bulk phase's rules (an unchanged row
// keeps its version) and write change events only with the import's
// --events. Batches refused for a partition that moved are written to its
// new owner.
func (f *follower) applyRound(ctx context.Context, round []write) error {
	var userUp, userDel, itemUp, itemDel []Record
	itemTable := map[string]*sourceTable{} // by user: one write per user in a round
	var configUp []catalog.ImportConfigEntry
	var configDel []Record
	for _, w := range round {
		r := w.rec
		if w.st.Entity != EntityConfig {
			r.Partition = router.Partition(r.UserID, f.cl.Partitions())
		}
		switch {
		case w.st.Entity == EntityUser && w.delete:
			userDel = append(userDel, r)
		case w.st.Entity == EntityUser:
			userUp = append(userUp, r)
		case w.st.Entity == EntityItem && w.delete:
			itemDel = append(itemDel, r)
		case w.st.Entity == EntityItem:
			itemUp = append(itemUp, r)
			itemTable[r.UserID] = w.st
		case w.delete:
			configDel = append(configDel, r)
		default:
			configUp = append(configUp, catalog.ImportConfigEntry{Namespace: r.Namespace, Key: r.ItemKey, Value: []byte(r.JSON)})
		}
	}
	var g errgroup.Group
	perShard := func(recs []Record, fn func(*shards.Shard, []Record) error) {
		if len(recs) == 0 {
			return
		}
		g.Go(func() error {
			var sg errgroup.Group
			groups := map[*shards.Shard][]Record{}
			for _, rec := range recs {
				sh := f.cl.Owner(rec.Partition)
				groups[sh] = append(groups[sh], rec)
			}
			for _, batch := range groups {
				sg.Go(func() error { return f.cl.route(ctx, batch, fn) })
			}
			return sg.Wait()
		})
	}
	perShard(userDel, func(sh *shards.Shard, batch []Record) error {
		refs := make([]shards.UserRef, len(batch))
		for i, r := range batch {
			refs[i] = shards.UserRef{Partition: r.Partition, UserID: r.UserID}
		}
		_, err := sh.PurgeUsers(ctx, refs, f.events)
		return err
	})
	perShard(userUp, func(sh *shards.Shard, batch []Record) error {
		rows := make([]shards.ImportUser, len(batch))
		for i, r := range batch {
			rows[i] = shards.ImportUser{Partition: r.Partition, UserID: r.UserID, Profile: []byte(r.JSON)}
		}
		_, err := sh.ApplyUsers(ctx, rows, f.events)
		return err
	})
	perShard(itemDel, func(sh *shards.Shard, batch []Record) error {
		refs := make([]shards.ItemRef, len(batch))
		for i, r := range batch {
			refs[i] = shards.ItemRef{Partition: r.Partition, UserID: r.UserID, Collection: r.Collection, Key: r.ItemKey}
		}
		_, err := sh.PurgeItems(ctx, refs, f.events)
		return err
	})
	var rejectMu sync.Mutex
	perShard(itemUp, func(sh *shards.Shard, batch []Record) error {
		rows := make([]shards.ImportItem, len(batch))
		for i, r := range batch {
			rows[i] = shards.ImportItem{Partition: r.Partition, UserID: r.UserID, Collection: r.Collection, Key: r.ItemKey, Value: []byte(r.JSON)}
		}
		res, err := sh.ApplyItems(ctx, rows, f.events)
		if err != nil || len(res.MissingUsers) == 0 {
			return err
		}
		if !f.opts.SkipInvalid {
			// The batch's other items are written: applied again when
			// the follower restarts, they are unchanged.
			for _, r := range batch {
				if r.UserID == res.MissingUsers[0].UserID {
					return missingUser(itemTable[r.UserID], &r)
				}
			}
		}
		rejectMu.Lock()
		defer rejectMu.Unlock()
		for _, u := range res.MissingUsers {
			for _, r := range batch {
				if r.UserID == u.UserID {
					if err := f.bulk.reject(missingUser(itemTable[r.UserID], &r)); err != nil {
						return err
					}
				}
			}
		}
		return nil
	})
	if len(configUp) > 0 {
		g.Go(func() error {
			_, err := f.cl.Catalog.ImportConfig(ctx, configUp)
			return err
		})
	}
	if len(configDel) > 0 {
		g.Go(func() error {
			for _, r := range configDel {
				if err := f.cl.Catalog.DeleteConfig(ctx, r.Namespace, r.ItemKey, nil); err != nil && !errors.Is(err, versioning.ErrNotFound) {
					return err
				}
			}
			return nil
		})
	}
	return g.Wait()
}

func missingUser(st *sourceTable, r *Record) *RowError {
	return &RowError{Table: st.Name, KeyCols: st.PrimaryKey, Key: r.Key, Field: "user_id", Msg: fmt.Sprintf("user %q does not exist in Shardgate", r.UserID)}
}
