package importer

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pglogrepl"

	"github.com/shardgate/shardgate/catalog"
)

// TableStatus is one mapped table's progress.
type TableStatus struct {
	Name     string `json:"name"`
	Total    int64  `json:"total"`
	Copied   int64  `json:"copied"`
	Rejected int64  `json:"rejected"`
	Done     bool   `json:"done"`
	Inserts  int64  `json:"inserts"`
	Updates  int64  `json:"updates"`
	Deletes  int64  `json:"deletes"`
	// Lag of a table with a change received but not yet applied (Pending):
	// the source's WAL written since the position the follower had applied
	// when that change arrived, and how long ago the change committed. A
	// table with nothing pending shows 0: which tables the WAL not yet
	// received touches cannot be known before it is decoded, so the
	// import's LagBytes (per slot) is the bound for every table.
	Pending    bool    `json:"pending"`
	LagBytes   int64   `json:"lag_bytes"`
	LagSeconds float64 `json:"lag_seconds"`
}

// Status is an import's state, as the catalog and the source report it.
type Status struct {
	Name       string `json:"name"`
	State      string `json:"state"`
	Slot       string `json:"slot"`
	StartLSN   string `json:"start_lsn"`
	AppliedLSN string `json:"applied_lsn"`
	SourceLSN  string `json:"source_lsn"`
	// LagBytes is the slot's lag: the source's WAL not yet applied, for
	// all tables together (changes apply in commit order).
	LagBytes   int64         `json:"lag_bytes"`
	SlotActive bool          `json:"slot_active"`
	Heartbeat  time.Duration `json:"heartbeat_age_ns"` // since the follower last recorded progress
	Error      string        `json:"error,omitempty"`
	Tables     []TableStatus `json:"tables"`
}

// GetStatus reads the import's progress and, from the source, its lag.
func GetStatus(ctx context.Context, cl *Cluster, sourceDSN, name string) (*Status, error) {
	rec, tables, err := cl.Catalog.GetImport(ctx, name)
	if err != nil {
		return nil, err
	}
	s := &Status{Name: rec.Name, State: rec.State, Slot: rec.Slot, StartLSN: rec.StartLSN, AppliedLSN: rec.AppliedLSN, Error: rec.Error}
	if !rec.AppliedAt.IsZero() {
		s.Heartbeat = time.Since(rec.AppliedAt)
	}
	if sourceDSN != "" && rec.State != catalog.ImportCutOver && rec.State != catalog.ImportCancelled {
		src, err := connectSource(ctx, sourceDSN)
		if err != nil {
			return nil, err
		}
		defer src.Close(context.Background())
		if err := src.QueryRow(ctx, `SELECT pg_current_wal_lsn()::text, coalesce((SELECT active FROM pg_replication_slots WHERE slot_name = $1), false)`,
			rec.Slot).Scan(&s.SourceLSN, &s.SlotActive); err != nil {
			return nil, fmt.Errorf("source: %w", err)
		}
		pos := rec.AppliedLSN
		if pos == "" {
			pos = rec.StartLSN
		}
		if pos != "" {
			cur, _ := pglogrepl.ParseLSN(s.SourceLSN)
			done, _ := pglogrepl.ParseLSN(pos)
			if cur > done {
				s.LagBytes = int64(cur - done)
			}
		}
	}
	for _, t := range tables {
		ts := TableStatus{Name: t.Name, Total: t.TotalRows, Copied: t.RowsCopied, Rejected: t.RowsRejected, Done: t.Done,
			Inserts: t.Inserts, Updates: t.Updates, Deletes: t.Deletes}
		if !t.PendingSince.IsZero() {
			ts.Pending = true
			ts.LagSeconds = time.Since(t.PendingSince).Seconds()
			cur, err1 := pglogrepl.ParseLSN(s.SourceLSN)
			from, err2 := pglogrepl.ParseLSN(t.PendingLSN)
			if err1 == nil && err2 == nil && cur > from {
				ts.LagBytes = int64(cur - from)
			}
		}
		s.Tables = append(s.Tables, ts)
	}
	return s, nil
}

// CutoverOptions tunes Cutover.
type CutoverOptions struct {
	// Timeout bounds the wait for zero lag; default 5 minutes.
	Timeout time.Duration
	Verify  VerifyOptions
}

// CutoverResult is what Cutover did.
type CutoverResult struct {
	AppliedLSN string        `json:"applied_lsn"`
	Waited     time.Duration `json:"waited_ns"`
	Verify     *VerifyReport `json:"verify"`
	Steps      []string      `json:"next_steps"`
}

// Cutover finishes an import once the source is quiet: it waits until the
// follower has applied everything the source had written when Cutover
// started (zero lag), verifies, stops the follower and drops the slot and
// the publication. A failed verification leaves the import following.
func Cutover(ctx context.Context, cl *Cluster, m *Mapping, sourceDSN, name string, opts CutoverOptions) (*CutoverResult, error) {
	if opts.Timeout <= 0 {
		opts.Timeout = 5 * time.Minute
	}
	rec, _, err := cl.Catalog.GetImport(ctx, name)
	if err != nil {
		return nil, err
	}
	if rec.State != catalog.ImportFollowing {
		return nil, fmt.Errorf("import %s is %s: %w", name, rec.State, ErrNotFollowing)
	}
	src, err := connectSource(ctx, sourceDSN)
	if err != nil {
		return nil, err
	}
	defer src.Close(context.Background())
	var target pglogrepl.LSN
	if err := src.QueryRow(ctx, `SELECT pg_current_wal_lsn()`).Scan(&target); err != nil {
		return nil, fmt.Errorf("source: %w", err)
	}
	start := time.Now()
	res := &CutoverResult{}
	for {
		rec, _, err = cl.Catalog.GetImport(ctx, name)
		if err != nil {
			return nil, err
		}
		applied, _ := pglogrepl.ParseLSN(rec.AppliedLSN)
		if rec.AppliedLSN != "" && applied >= target {
			res.AppliedLSN = rec.AppliedLSN
			break
		}
		if time.Since(start) > opts.Timeout {
			return nil, fmt.Errorf("lag did not reach zero in %s (applied %s, source at %s): is 'shardctl import follow' running, and have writes to the source stopped?",
				opts.Timeout, rec.AppliedLSN, target)
		}
		select {
		case <-time.After(100 * time.Millisecond):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	res.Waited = time.Since(start)
	if res.Verify, err = Verify(ctx, cl, m, sourceDSN, opts.Verify); err != nil {
		return nil, err
	}
	if !res.Verify.OK {
		return res, fmt.Errorf("verify failed: the import keeps following; fix the differences (or cancel) and cut over again")
	}
	// The follower sees the state and stops; dropSlot waits for it.
	if err := cl.Catalog.SetImportState(ctx, name, catalog.ImportCutOver, ""); err != nil {
		return nil, err
	}
	if _, err := dropSlot(ctx, src, rec.Slot); err != nil {
		return nil, err
	}
	if _, err := src.Exec(ctx, "DROP PUBLICATION IF EXISTS "+quoteIdent(rec.Publication)); err != nil {
		return nil, fmt.Errorf("source: drop publication: %w", err)
	}
	res.Steps = []string{
		"point the application's reads and writes at Shardgate (the mapped IDs: user IDs as the mapping builds them)",
		"keep the source read-only (REVOKE INSERT, UPDATE, DELETE ... or default_transaction_read_only) until you no longer need a way back",
		"to go back: 'shardctl export --out DIR' writes Shardgate's data as NDJSON",
		"users sign in again: sessions are not imported",
	}
	return res, nil
}

func quoteIdent(s string) string { return `"` + strings.ReplaceAll(s, `"`, `""`) + `"` }
