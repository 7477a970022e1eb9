package importer

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/shardgate/shardgate/catalog"
	"github.com/shardgate/shardgate/router"
	"github.com/shardgate/shardgate/shards"
)

// CancelResult says what Cancel removed.
type CancelResult struct {
	SlotDropped bool             `json:"slot_dropped"`
	Purged      map[Entity]int64 `json:"purged,omitempty"`
}

// CancelOptions is what Cancel needs besides the import's name: for an
// import from a database its source (and, to purge, its mapping); for a
// load of an export, to purge, the export directory.
type CancelOptions struct {
	SourceDSN string
	Mapping   *Mapping
	ExportDir string
	Purge     bool
}

// Cancel ends the import name and removes its checkpoints. For an import
// from a database it stops the follower and drops the slot and publication
// on the source; with Purge it also deletes from Shardgate every row the
// mapping maps the source's current rows to. For a load of an export
// (ImportNDJSON) it waits for no load to be running; with Purge it deletes
// every row the export holds. Purged rows leave tombstones and delete
// events, so an import can be started over from nothing. An import that
// was cut over (or a load that finished) cannot be cancelled: its rows are
// live data.
func Cancel(ctx context.Context, cl *Cluster, name string, opts CancelOptions) (CancelResult, error) {
	var res CancelResult
	rec, _, err := cl.Catalog.GetImport(ctx, name)
	if err != nil {
		return res, err
	}
	if rec.State == catalog.ImportCutOver {
		if rec.SourceID == SourceNDJSON {
			return res, fmt.Errorf("import %s finished loading its export: its rows are live data now", name)
		}
		return res, fmt.Errorf("import %s was cut over: its rows are live data now", name)
	}
	if rec.SourceID == SourceNDJSON {
		return cancelNDJSON(ctx, cl, rec, opts)
	}
	if opts.SourceDSN == "" {
		return res, fmt.Errorf("import %s reads a source database: cancelling it needs that database's DSN (its slot and publication are dropped)", name)
	}
	if opts.Purge && opts.Mapping == nil {
		return res, errors.New("purge needs the mapping")
	}
	// A follower sees this and stops.
	if err := cl.Catalog.SetImportState(ctx, name, catalog.ImportCancelled, ""); err != nil {
		return res, err
	}
	src, err := connectSource(ctx, opts.SourceDSN)
	if err != nil {
		return res, err
	}
	defer src.Close(context.Background())
	if res.SlotDropped, err = dropSlot(ctx, src, rec.Slot); err != nil {
		return res, err
	}
	if _, err := src.Exec(ctx, "DROP PUBLICATION IF EXISTS "+pgx.Identifier{rec.Publication}.Sanitize()); err != nil {
		return res, fmt.Errorf("source: drop publication: %w", err)
	}
	if opts.Purge {
		if res.Purged, err = purgeMapped(ctx, cl, opts.Mapping, src); err != nil {
			return res, err
		}
	}
	return res, cl.Catalog.DeleteImport(ctx, name)
}

// cancelNDJSON cancels a load of an export. The load's lock is taken, so a
// load still running makes it fail (ErrImportBusy) rather than race it.
func cancelNDJSON(ctx context.Context, cl *Cluster, rec catalog.ImportRecord, opts CancelOptions) (CancelResult, error) {
	var res CancelResult
	var m *Manifest
	if opts.Purge {
		if opts.ExportDir == "" {
			return res, fmt.Errorf("import %s loads an export: purging it needs that export's directory", rec.Name)
		}
		raw, err := os.ReadFile(filepath.Join(opts.ExportDir, ManifestName))
		if err != nil {
			return res, err
		}
		if sum := sha256.Sum256(raw); hex.EncodeToString(sum[:]) != rec.MappingHash {
			return res, fmt.Errorf("%s is not the export import %s loaded (its manifest differs): nothing purged", opts.ExportDir, rec.Name)
		}
		if m, err = ReadManifest(opts.ExportDir); err != nil {
			return res, err
		}
	}
	release, err := cl.Catalog.LockImport(ctx, rec.Name)
	if err != nil {
		return res, err
	}
	defer release()
	if err := cl.Catalog.SetImportState(ctx, rec.Name, catalog.ImportCancelled, ""); err != nil {
		return res, err
	}
	if m != nil {
		if res.Purged, err = purgeExport(ctx, cl, opts.ExportDir, m); err != nil {
			return res, err
		}
	}
	return res, cl.Catalog.DeleteImport(ctx, rec.Name)
}

// dropSlot drops the slot, ending the walsender that holds it (a follower
// that has not stopped yet).
func dropSlot(ctx context.Context, src *pgx.Conn, slot string) (bool, error) {
	for attempt := 0; ; attempt++ {
		var pid *int32
		err := src.QueryRow(ctx, `SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1`, slot).Scan(&pid)
		if errors.Is(err, pgx.ErrNoRows) {
			return false, nil
		}
		if err != nil {
			return false, fmt.Errorf("source: %w", err)
		}
		if pid != nil {
			if attempt > 50 {
				return false, fmt.Errorf("source: slot %s stays in use by process %d", slot, *pid)
			}
			if attempt > 10 {
				src.Exec(ctx, `SELECT pg_terminate_backend($1)`, *pid)
			}
			time.Sleep(100 * time.Millisecond)
			continue
		}
		if _, err := src.Exec(ctx, `SELECT pg_drop_replication_slot($1)`, slot); err != nil {
			return false, fmt.Errorf("source: drop slot %s: %w", slot, err)
		}
		return true, nil
	}
}

// purgeMapped deletes what the source's rows map to: items and config
// first, then users (which takes their remaining items along).
func purgeMapped(ctx context.Context, cl *Cluster, m *Mapping, src *pgx.Conn) (map[Entity]int64, error) {
	tx, err := src.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly})
	if err != nil {
		return nil, fmt.Errorf("source: %w", err)
	}
	defer tx.Rollback(context.Background())
	out := map[Entity]int64{}
	order := slices.Clone(m.Tables)
	slices.SortStableFunc(order, func(a, b Table) int {
		return boolInt(a.Entity == EntityUser) - boolInt(b.Entity == EntityUser)
	})
	for i := range order {
		st, err := describe(ctx, tx, &order[i])
		if err != nil {
			return out, err
		}
		_, err = eachBatch(ctx, tx, st, 1<<30, cl.Partitions(), 2000, func(recs []Record) error {
			return purgeRecords(ctx, cl, st.Entity, recs, out)
		})
		if err != nil {
			return out, err
		}
	}
	return out, nil
}

// purgeRecords deletes the rows recs address (all of entity), with
// tombstones and delete events, adding the number deleted to out.
func purgeRecords(ctx context.Context, cl *Cluster, entity Entity, recs []Record, out map[Entity]int64) error {
	if entity == EntityConfig {
		ns := make([]string, len(recs))
		keys := make([]string, len(recs))
		for i, r := range recs {
			ns[i], keys[i] = r.Namespace, r.ItemKey
		}
		n, err := cl.Catalog.PurgeConfig(ctx, ns, keys)
		out[EntityConfig] += n
		return err
	}
	return cl.route(ctx, recs, func(sh *shards.Shard, batch []Record) error {
		var n int64
		var err error
		if entity == EntityUser {
			refs := make([]shards.UserRef, len(batch))
			for i, r := range batch {
				refs[i] = shards.UserRef{Partition: r.Partition, UserID: r.UserID}
			}
			n, err = sh.PurgeUsers(ctx, refs, true)
		} else {
			refs := make([]shards.ItemRef, len(batch))
			for i, r := range batch {
				refs[i] = shards.ItemRef{Partition: r.Partition, UserID: r.UserID, Collection: r.Collection, Key: r.ItemKey}
			}
			n, err = sh.PurgeItems(ctx, refs, true)
		}
		out[entity] += n
		return err
	})
}

// purgeExport deletes every row an export holds: items and config first,
// then users (which takes their remaining items along). Rows are found at
// this cluster's partitions, as ImportNDJSON wrote them.
func purgeExport(ctx context.Context, cl *Cluster, dir string, m *Manifest) (map[Entity]int64, error) {
	out := map[Entity]int64{}
	type file struct {
		entity Entity
		name   string
	}
	var files []file
	for _, r := range m.Ranges {
		files = append(files, file{EntityItem, r.Items.Name})
	}
	if m.Config != nil {
		files = append(files, file{EntityConfig, m.Config.Name})
	}
	for _, r := range m.Ranges {
		files = append(files, file{EntityUser, r.Users.Name})
	}
	partitions := cl.Partitions()
	for _, f := range files {
		var recs []Record
		flush := func() error {
			err := purgeRecords(ctx, cl, f.entity, recs, out)
			recs = recs[:0]
			return err
		}
		err := eachLine(dir, f.name, func(line []byte) error {
			var r Record
			switch f.entity {
			case EntityUser:
				var u UserLine
				if err := json.Unmarshal(line, &u); err != nil {
					return err
				}
				r = Record{UserID: u.UserID}
			case EntityItem:
				var it ItemLine
				if err := json.Unmarshal(line, &it); err != nil {
					return err
				}
				r = Record{UserID: it.UserID, Collection: it.Collection, ItemKey: it.Key}
			case EntityConfig:
				var c ConfigLine
				if err := json.Unmarshal(line, &c); err != nil {
					return err
				}
				r = Record{Namespace: c.Namespace, ItemKey: c.Key}
			}
			if r.UserID != "" {
				r.Partition = router.Partition(r.UserID, partitions)
			}
			recs = append(recs, r)
			if len(recs) < 2000 {
				return nil
			}
			return flush()
		})
		if err == nil && len(recs) > 0 {
			err = flush()
		}
		if err != nil {
			return out, fmt.Errorf("%s: %w", f.name, err)
		}
	}
	return out, nil
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}
