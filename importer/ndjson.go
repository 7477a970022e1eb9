package importer

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sync/errgroup"

	"github.com/shardgate/shardgate/catalog"
	"github.com/shardgate/shardgate/router"
	"github.com/shardgate/shardgate/shards"
)

// An export is a directory of NDJSON files, one per entity and partition
// range (users-00000-00511.ndjson, items-…), config.ndjson, and
// manifest.json listing each finished file with its line count and
// SHA-256. A file is listed only once complete, so an interrupted export
// continues with the ranges not listed.

// ExportFormat names the export format in its manifest.
const ExportFormat = "shardgate-export/1"

// ManifestName is the manifest's file name in an export directory.
const ManifestName = "manifest.json"

// Manifest describes an export directory.
type Manifest struct {
	Format         string          `json:"format"`
	PartitionCount int             `json:"partition_count"`
	Ranges         []ManifestRange `json:"ranges"`
	Config         *ManifestFile   `json:"config,omitempty"`
	Complete       bool            `json:"complete"`
}

// ManifestRange is the files of one partition range, first to last.
type ManifestRange struct {
	First int32        `json:"first"`
	Last  int32        `json:"last"`
	Users ManifestFile `json:"users"`
	Items ManifestFile `json:"items"`
}

// ManifestFile is one finished NDJSON file.
type ManifestFile struct {
	Name   string `json:"name"`
	Lines  int64  `json:"lines"`
	SHA256 string `json:"sha256"`
}

// UserLine is a line of a users file.
type UserLine struct {
	UserID    string          `json:"user_id"`
	Partition int32           `json:"partition"`
	Profile   json.RawMessage `json:"profile"`
	Version   int64           `json:"version"`
}

// ItemLine is a line of an items file.
type ItemLine struct {
	UserID     string          `json:"user_id"`
	Partition  int32           `json:"partition"`
	Collection string          `json:"collection"`
	Key        string          `json:"key"`
	Value      json.RawMessage `json:"value"`
	Version    int64           `json:"version"`
}

// ConfigLine is a line of config.ndjson.
type ConfigLine struct {
	Namespace string          `json:"namespace"`
	Key       string          `json:"key"`
	Value     json.RawMessage `json:"value"`
	Version   int64           `json:"version"`
}

// ReadManifest reads dir's manifest; a missing one is an empty manifest.
func ReadManifest(dir string) (*Manifest, error) {
	b, err := os.ReadFile(filepath.Join(dir, ManifestName))
	if os.IsNotExist(err) {
		return &Manifest{Format: ExportFormat}, nil
	}
	if err != nil {
		return nil, err
	}
	var m Manifest
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("%s: %w", ManifestName, err)
	}
	if m.Format != ExportFormat {
		return nil, fmt.Errorf("%s: format %q, want %q", ManifestName, m.Format, ExportFormat)
	}
	return &m, nil
}

// WriteManifest replaces dir's manifest atomically.
func WriteManifest(dir string, m *Manifest) error {
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	tmp := filepath.Join(dir, ManifestName+".tmp")
	if err := os.WriteFile(tmp, append(b, '\n'), 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(dir, ManifestName))
}

// NDJSONWriter writes one export file: to a temporary name until Finish
// renames it, counting lines and hashing what it writes.
type NDJSONWriter struct {
	f     *os.File
	w     *bufio.Writer
	h     io.Writer
	sum   interface{ Sum([]byte) []byte }
	path  string
	name  string
	lines int64
}

// NewNDJSONWriter starts file name in dir.
func NewNDJSONWriter(dir, name string) (*NDJSONWriter, error) {
	path := filepath.Join(dir, name)
	f, err := os.Create(path + ".part")
	if err != nil {
		return nil, err
	}
	h := sha256.New()
	return &NDJSONWriter{f: f, w: bufio.NewWriterSize(io.MultiWriter(f, h), 1<<16), h: h, sum: h, path: path, name: name}, nil
}

// Write writes v as one line.
func (w *NDJSONWriter) Write(v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	w.lines++
	if _, err := w.w.Write(b); err != nil {
		return err
	}
	return w.w.WriteByte('\n')
}

// Finish flushes, syncs and renames the file into place.
func (w *NDJSONWriter) Finish() (ManifestFile, error) {
	if err := w.w.Flush(); err != nil {
		return ManifestFile{}, err
	}
	if err := w.f.Sync(); err != nil {
		return ManifestFile{}, err
	}
	if err := w.f.Close(); err != nil {
		return ManifestFile{}, err
	}
	if err := os.Rename(w.path+".part", w.path); err != nil {
		return ManifestFile{}, err
	}
	return ManifestFile{Name: w.name, Lines: w.lines, SHA256: hex.EncodeToString(w.sum.Sum(nil))}, nil
}

// Abort removes the unfinished file.
func (w *NDJSONWriter) Abort() {
	w.f.Close()
	os.Remove(w.path + ".part")
}

// NDJSONResult counts what ImportNDJSON wrote.
type NDJSONResult struct {
	Users, Items, Config int64
	Written              int64 // rows inserted or changed by this run (the rest were already as exported)
	Resumed              bool  // a load interrupted before was continued
}

// NDJSONOptions tunes ImportNDJSON. The zero value works.
type NDJSONOptions struct {
	// Name names the load in the catalog, where its checkpoints are kept;
	// default "default".
	Name      string
	BatchRows int  // rows per batch; default 5000
	Parallel  int  // files loaded at once; default 1
	Events    bool // write a change event for every row written
}

// SourceNDJSON is the source of an import that loads an export.
const SourceNDJSON = "ndjson"

// ImportNDJSON loads an export into the cluster: users, then config, then
// items, checking every file against the manifest first. Rows get this
// cluster's partitions; their exported versions are kept where the rules
// allow (a new row above its tombstone and the partition's floor, a
// changed row above its current version; a row already as exported is
// left alone). Progress is checkpointed in the catalog (per file, the
// lines loaded), so a load killed midway, run again with the same export,
// continues where it stopped; one process at a time runs it. Change
// events are written with events.
func ImportNDJSON(ctx context.Context, cl *Cluster, dir string, opts NDJSONOptions) (NDJSONResult, error) {
	var res NDJSONResult
	if opts.Name == "" {
		opts.Name = "default"
	}
	if opts.BatchRows <= 0 {
		opts.BatchRows = 5000
	}
	if !importNameRE.MatchString(opts.Name) {
		return res, fmt.Errorf("import name %q: want 1-31 characters of [a-z0-9_]", opts.Name)
	}
	raw, err := os.ReadFile(filepath.Join(dir, ManifestName))
	if err != nil {
		return res, err
	}
	m, err := ReadManifest(dir)
	if err != nil {
		return res, err
	}
	if !m.Complete {
		return res, fmt.Errorf("%s: the export is not complete (run 'shardctl export' again to finish it)", dir)
	}
	var files []ManifestFile
	for _, r := range m.Ranges {
		files = append(files, r.Users)
	}
	if m.Config != nil {
		files = append(files, *m.Config)
	}
	for _, r := range m.Ranges {
		files = append(files, r.Items)
	}
	for _, f := range files {
		if err := checkFile(dir, f); err != nil {
			return res, err
		}
	}

	release, err := cl.Catalog.LockImport(ctx, opts.Name)
	if err != nil {
		return res, err
	}
	defer release()
	sum := sha256.Sum256(raw)
	hash := hex.EncodeToString(sum[:])
	done := map[string]catalog.ImportTable{}
	rec, progress, err := cl.Catalog.GetImport(ctx, opts.Name)
	switch {
	case errors.Is(err, catalog.ErrNoImport) || err == nil && (rec.State == catalog.ImportCancelled || rec.State == catalog.ImportCutOver):
		names := make([]string, len(files))
		for i, f := range files {
			names[i] = f.Name
		}
		if err := cl.Catalog.CreateImport(ctx, catalog.ImportRecord{Name: opts.Name, MappingHash: hash, SourceID: SourceNDJSON, Events: opts.Events}, names); err != nil {
			return res, err
		}
	case err != nil:
		return res, err
	case rec.SourceID != SourceNDJSON:
		return res, fmt.Errorf("import %s is an import from a database, not yet finished: give this load another --name", opts.Name)
	case rec.MappingHash != hash:
		return res, fmt.Errorf("import %s is loading another export (its manifest differs); finish it or 'shardctl import cancel' it", opts.Name)
	default:
		res.Resumed = true
		opts.Events = rec.Events
		for _, t := range progress {
			done[t.Name] = t
		}
	}

	partitions := cl.Partitions()
	var mu sync.Mutex
	count := func(written int64, n *int64, lines int64) {
		mu.Lock()
		defer mu.Unlock()
		res.Written += written
		*n += lines
	}

	// Users, then config, then items (which need their users); the files
	// of one kind load in parallel: they hold different partitions.
	loadKind := func(fs []ManifestFile, n *int64, batch func(ctx context.Context, lines [][]byte) (int64, error)) error {
		g, gctx := errgroup.WithContext(ctx)
		g.SetLimit(max(opts.Parallel, 1))
		for _, f := range fs {
			g.Go(func() error {
				cp := done[f.Name]
				count(0, n, cp.RowsCopied)
				if cp.Done {
					return nil
				}
				return loadFile(dir, f.Name, opts.BatchRows, cp.RowsCopied, func(lines [][]byte, through int64) error {
					written, err := batch(gctx, lines)
					if err != nil {
						return err
					}
					count(written, n, int64(len(lines)))
					return cl.Catalog.CheckpointImportTable(gctx, opts.Name, f.Name, []string{strconv.FormatInt(through, 10)}, through, 0, false)
				}, func(through int64) error {
					return cl.Catalog.CheckpointImportTable(gctx, opts.Name, f.Name, []string{strconv.FormatInt(through, 10)}, through, 0, true)
				})
			})
		}
		return g.Wait()
	}
	var users, items []ManifestFile
	for _, r := range m.Ranges {
		users, items = append(users, r.Users), append(items, r.Items)
	}
	err = loadKind(users, &res.Users, func(ctx context.Context, lines [][]byte) (int64, error) {
		batch := make([]shards.ImportUser, len(lines))
		for i, line := range lines {
			var u UserLine
			if err := json.Unmarshal(line, &u); err != nil {
				return 0, err
			}
			if err := ValidUserID(u.UserID); err != nil {
				return 0, fmt.Errorf("user_id %q: %v", u.UserID, err)
			}
			batch[i] = shards.ImportUser{Partition: router.Partition(u.UserID, partitions), UserID: u.UserID, Profile: u.Profile, Version: u.Version}
		}
		var written int64
		err := cl.routeUsers(ctx, batch, func(sh *shards.Shard, b []shards.ImportUser) error {
			w, err := sh.ImportUsers(ctx, b, opts.Events)
			written += w.Written
			return err
		})
		return written, err
	})
	if err == nil && m.Config != nil {
		err = loadKind([]ManifestFile{*m.Config}, &res.Config, func(ctx context.Context, lines [][]byte) (int64, error) {
			entries := make([]catalog.ImportConfigEntry, len(lines))
			for i, line := range lines {
				var c ConfigLine
				if err := json.Unmarshal(line, &c); err != nil {
					return 0, err
				}
				entries[i] = catalog.ImportConfigEntry{Namespace: c.Namespace, Key: c.Key, Value: c.Value}
			}
			return cl.Catalog.ImportConfig(ctx, entries)
		})
	}
	if err == nil {
		err = loadKind(items, &res.Items, func(ctx context.Context, lines [][]byte) (int64, error) {
			batch := make([]shards.ImportItem, len(lines))
			for i, line := range lines {
				var it ItemLine
				if err := json.Unmarshal(line, &it); err != nil {
					return 0, err
				}
				if err := ValidUserID(it.UserID); err != nil {
					return 0, fmt.Errorf("user_id %q: %v", it.UserID, err)
				}
				batch[i] = shards.ImportItem{Partition: router.Partition(it.UserID, partitions), UserID: it.UserID,
					Collection: it.Collection, Key: it.Key, Value: it.Value, Version: it.Version}
			}
			var written int64
			err := cl.routeItems(ctx, batch, func(sh *shards.Shard, b []shards.ImportItem) error {
				w, err := sh.ImportItems(ctx, b, opts.Events, false)
				written += w.Written
				return err
			})
			return written, err
		})
	}
	if err != nil {
		cl.Catalog.SetImportError(context.Background(), opts.Name, err.Error())
		return res, err
	}
	return res, cl.Catalog.SetImportState(ctx, opts.Name, catalog.ImportCutOver, "")
}

// checkFile checks a file against its manifest entry.
func checkFile(dir string, mf ManifestFile) error {
	if mf.Name == "" || strings.ContainsAny(mf.Name, `/\`) || mf.Name == ".." {
		return fmt.Errorf("%s: bad file name %q", ManifestName, mf.Name)
	}
	f, err := os.Open(filepath.Join(dir, mf.Name))
	if err != nil {
		return err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return err
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != mf.SHA256 {
		return fmt.Errorf("%s: SHA-256 %s, the manifest says %s: the file changed since the export", mf.Name, got, mf.SHA256)
	}
	return nil
}

// loadFile hands the lines of the file name in dir after the first skip
// to batch in batches of size (the last one shorter), with the number of
// lines through the batch's last, then calls end with the file's line
// count; an error names the file and line.
func loadFile(dir, name string, size int, skip int64, batch func(lines [][]byte, through int64) error, end func(lines int64) error) error {
	var (
		lines [][]byte
		n     int64
	)
	err := eachLine(dir, name, func(line []byte) error {
		n++
		if n <= skip {
			return nil
		}
		lines = append(lines, bytes.Clone(line))
		if len(lines) < size {
			return nil
		}
		err := batch(lines, n)
		lines = lines[:0]
		return err
	})
	if err == nil && len(lines) > 0 {
		err = batch(lines, n)
	}
	if err == nil {
		err = end(n)
	}
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	return nil
}

// eachLine calls fn with every line of a file (lines may be long: JSON
// values up to the server's limit).
func eachLine(dir, name string, fn func([]byte) error) error {
	f, err := os.Open(filepath.Join(dir, name))
	if err != nil {
		return err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<16), 64<<20)
	n := 0
	for sc.Scan() {
		n++
		if err := fn(sc.Bytes()); err != nil {
			return fmt.Errorf("line %d: %w", n, err)
		}
	}
	return sc.Err()
}
