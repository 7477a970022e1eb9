package pglock

// Every advisory lock Shardgate takes, in one list, so no two uses share an
// ID by accident. Advisory locks belong to one database: the same ID taken
// on each shard admits one holder per shard.
//
// Two-key locks (class, key) never collide with single-key (bigint) ones,
// such as goose's migration lock, so the classes only need to differ from
// each other. "SG" is 0x5347.
const (
	// ClassRelay: one outbox relay per database, held for the relay's
	// term on its own connection (package events).
	ClassRelay int32 = 0x53470001
	// KeyRelayShard elects the relay of a shard's outbox.
	KeyRelayShard int32 = 1
	// KeyRelayConfig elects the relay of the catalog's config outbox.
	KeyRelayConfig int32 = 2

	// ClassMaintenance: per-transaction locks of the background work that
	// one instance at a time does in a database.
	ClassMaintenance int32 = 0x53470002
	// KeySweep admits one expired-session sweeper per shard.
	KeySweep int32 = 1
	// KeyPrune admits one tombstone pruner per shard, and one for the
	// catalog's config tombstones. It differs from KeySweep so that the
	// sweeper and the pruner may run side by side.
	KeyPrune int32 = 2

	// ClassMover: the rebalancing executor, one per cluster, held on its
	// own catalog connection for its term (package mover).
	ClassMover int32 = 0x53470003
	// KeyMoverExecutor elects the executor.
	KeyMoverExecutor int32 = 1

	// ClassImport: one process at a time runs an import's bulk or follow
	// phase, held on its own catalog connection while it runs (package
	// importer); the second key is hashtext(import name).
	ClassImport int32 = 0x53470004

	// ClassConfigSchema is the first key of the per-namespace lock that
	// orders SetConfigSchema against SetConfig in the catalog; the second
	// is hashtext(namespace).
	ClassConfigSchema int32 = 0x5347

	// CreateCluster is the single-key lock 'shardgate init' holds on the
	// catalog, so two inits cannot both find it empty ("Shardgat").
	CreateCluster int64 = 0x5368617264676174
)
