package importer

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
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
	Written              int64 // rows inserted or changed (the rest were already as exported)
}

// ImportNDJSON loads an export into the cluster: users, then config, then
// items, checking every file against the manifest first. Rows get this
// cluster's partitions and versions (a row already as exported keeps its
// version), so running it again after an interruption finishes the job
// and doubles nothing. Change events are written with events; parallel
// ranges load at once.
func ImportNDJSON(ctx context.Context, cl *Cluster, dir string, batchRows, parallel int, events bool) (NDJSONResult, error) {
	var res NDJSONResult
	m, err := ReadManifest(dir)
	if err != nil {
		return res, err
	}
	if !m.Complete {
		return res, fmt.Errorf("%s: the export is not complete (run 'shardctl export' again to finish it)", dir)
	}
	var files []ManifestFile
	for _, r := range m.Ranges {
		files = append(files, r.Users, r.Items)
	}
	if m.Config != nil {
		files = append(files, *m.Config)
	}
	for _, f := range files {
		if err := checkFile(dir, f); err != nil {
			return res, err
		}
	}
	if batchRows <= 0 {
		batchRows = 5000
	}
	partitions := cl.Partitions()
	var mu sync.Mutex
	count := func(written int64, users, items *int64, n int64) {
		mu.Lock()
		defer mu.Unlock()
		res.Written += written
		if users != nil {
			*users += n
		}
		if items != nil {
			*items += n
		}
	}
	// Ranges load in parallel: they hold different partitions.
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(max(parallel, 1))
	for _, r := range m.Ranges {
		g.Go(func() error {
			return loadBatches(dir, r.Users.Name, batchRows, func(line []byte) (shards.ImportUser, error) {
				var u UserLine
				if err := json.Unmarshal(line, &u); err != nil {
					return shards.ImportUser{}, err
				}
				if err := ValidUserID(u.UserID); err != nil {
					return shards.ImportUser{}, fmt.Errorf("user_id %q: %v", u.UserID, err)
				}
				return shards.ImportUser{Partition: router.Partition(u.UserID, partitions), UserID: u.UserID, Profile: u.Profile}, nil
			}, func(batch []shards.ImportUser) error {
				return cl.routeUsers(gctx, batch, func(sh *shards.Shard, b []shards.ImportUser) error {
					w, err := sh.ImportUsers(gctx, b, events)
					count(w.Written, &res.Users, nil, int64(len(b)))
					return err
				})
			})
		})
	}
	if err := g.Wait(); err != nil {
		return res, err
	}
	if m.Config != nil {
		err := loadBatches(dir, m.Config.Name, batchRows, func(line []byte) (catalog.ImportConfigEntry, error) {
			var c ConfigLine
			if err := json.Unmarshal(line, &c); err != nil {
				return catalog.ImportConfigEntry{}, err
			}
			res.Config++
			return catalog.ImportConfigEntry{Namespace: c.Namespace, Key: c.Key, Value: c.Value}, nil
		}, func(entries []catalog.ImportConfigEntry) error {
			n, err := cl.Catalog.ImportConfig(ctx, entries)
			res.Written += n
			return err
		})
		if err != nil {
			return res, err
		}
	}
	g, gctx = errgroup.WithContext(ctx)
	g.SetLimit(max(parallel, 1))
	for _, r := range m.Ranges {
		g.Go(func() error {
			return loadBatches(dir, r.Items.Name, batchRows, func(line []byte) (shards.ImportItem, error) {
				var it ItemLine
				if err := json.Unmarshal(line, &it); err != nil {
					return shards.ImportItem{}, err
				}
				if err := ValidUserID(it.UserID); err != nil {
					return shards.ImportItem{}, fmt.Errorf("user_id %q: %v", it.UserID, err)
				}
				return shards.ImportItem{Partition: router.Partition(it.UserID, partitions), UserID: it.UserID,
					Collection: it.Collection, Key: it.Key, Value: it.Value}, nil
			}, func(batch []shards.ImportItem) error {
				return cl.routeItems(gctx, batch, func(sh *shards.Shard, b []shards.ImportItem) error {
					w, err := sh.ImportItems(gctx, b, events, false)
					count(w.Written, nil, &res.Items, int64(len(b)))
					return err
				})
			})
		})
	}
	if err := g.Wait(); err != nil {
		return res, err
	}
	return res, nil
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

// eachLine calls fn with every line of a file (lines may be long: JSON
// values up to the server's limit).
// loadBatches decodes each line of the file name in dir and hands the
// records to flush in batches of size (the last one shorter); an error
// names the file.
func loadBatches[T any](dir, name string, size int, decode func([]byte) (T, error), flush func([]T) error) error {
	batch := make([]T, 0, size)
	err := eachLine(dir, name, func(line []byte) error {
		rec, err := decode(line)
		if err != nil {
			return err
		}
		batch = append(batch, rec)
		if len(batch) >= size {
			err = flush(batch)
			batch = batch[:0]
		}
		return err
	})
	if err == nil && len(batch) > 0 {
		err = flush(batch)
	}
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	return nil
}

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
