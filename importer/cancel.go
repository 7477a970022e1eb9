package importer

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/shardgate/shardgate/catalog"
	"github.com/shardgate/shardgate/shards"
)

// CancelResult says what Cancel removed.
type CancelResult struct {
	SlotDropped bool             `json:"slot_dropped"`
	Purged      map[Entity]int64 `json:"purged,omitempty"`
}

// Cancel ends the import name: it stops its follower, drops its slot and
// publication on the source and removes its checkpoints. With purge it
// also deletes from Shardgate every row the mapping maps the source's
// current rows to (with tombstones and delete events), so an import can be
// started over from nothing. An import that was cut over cannot be
// cancelled: its rows are live data.
func Cancel(ctx context.Context, cl *Cluster, m *Mapping, sourceDSN, name string, purge bool) (CancelResult, error) {
	var res CancelResult
	rec, _, err := cl.Catalog.GetImport(ctx, name)
	if err != nil {
		return res, err
	}
	if rec.State == catalog.ImportCutOver {
		return res, fmt.Errorf("import %s was cut over: its rows are live data now", name)
	}
	// A follower sees this and stops.
	if err := cl.Catalog.SetImportState(ctx, name, catalog.ImportCancelled, ""); err != nil {
		return res, err
	}
	src, err := connectSource(ctx, sourceDSN)
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
	if purge {
		if m == nil {
			return res, errors.New("purge needs the mapping")
		}
		if res.Purged, err = purgeMapped(ctx, cl, m, src); err != nil {
			return res, err
		}
	}
	return res, cl.Catalog.DeleteImport(ctx, name)
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
			if st.Entity == EntityConfig {
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
				if st.Entity == EntityUser {
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
				out[st.Entity] += n
				return err
			})
		})
		if err != nil {
			return out, err
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
