package server

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"strconv"
	"time"
	"unsafe"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/shardgate/shardgate/auth"
	"github.com/shardgate/shardgate/cache"
	"github.com/shardgate/shardgate/catalog"
	"github.com/shardgate/shardgate/events"
	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
	"github.com/shardgate/shardgate/shards"
)

// DataService implements shardgate.v1.DataService. Its handlers take
// requests the validator has checked (requestRules, installed by
// NewGRPCServer); they check only what the rules cannot: state and
// combinations of fields.
type DataService struct {
	pb.UnimplementedDataServiceServer
	s *Server
}

// NewDataService returns the DataService of s.
func NewDataService(s *Server) *DataService { return &DataService{s: s} }

// PutUser creates or replaces a user's profile.
func (d *DataService) PutUser(ctx context.Context, req *pb.PutUserRequest) (*pb.PutUserResponse, error) {
	profile := storedJSON(req.GetProfileJson(), true)
	var v int64
	err := d.s.onUserWrite(ctx, req.GetUserId(), func(sh *shards.Shard, p int32) (err error) {
		v, err = sh.PutUser(ctx, p, req.GetUserId(), profile, req.ExpectedVersion)
		return err
	})
	if err != nil {
		return nil, err
	}
	return &pb.PutUserResponse{Version: v}, nil
}

// GetUser reads a user's profile.
func (d *DataService) GetUser(ctx context.Context, req *pb.GetUserRequest) (*pb.GetUserResponse, error) {
	var u shards.User
	err := d.s.onUser(ctx, req.GetUserId(), func(sh *shards.Shard, p int32) (err error) {
		u, err = sh.GetUser(ctx, p, req.GetUserId())
		return err
	})
	if err != nil {
		return nil, err
	}
	// One allocation for the response and its two timestamps.
	r := &struct {
		resp             pb.GetUserResponse
		created, updated timestamppb.Timestamp
	}{}
	r.created.Seconds, r.created.Nanos = unixParts(u.CreatedAt)
	r.updated.Seconds, r.updated.Nanos = unixParts(u.UpdatedAt)
	r.resp.UserId, r.resp.ProfileJson, r.resp.Version, r.resp.Partition = u.UserID, bytesString(u.Profile), u.Version, u.Partition
	r.resp.CreatedAt, r.resp.UpdatedAt = &r.created, &r.updated
	return &r.resp, nil
}

// unixParts is t as a protobuf Timestamp's fields (timestamppb.New
// without its allocation).
func unixParts(t time.Time) (int64, int32) { return t.Unix(), int32(t.Nanosecond()) }

// bytesString is b as a string without copying it. b must not change
// afterwards: it is a value just scanned for this call, handed to the
// response and forgotten.
func bytesString(b []byte) string { return unsafe.String(unsafe.SliceData(b), len(b)) }

// DeleteUser removes a user with all their sessions and items.
func (d *DataService) DeleteUser(ctx context.Context, req *pb.DeleteUserRequest) (*pb.DeleteUserResponse, error) {
	var res shards.DeleteUserResult
	err := d.s.onUserWrite(ctx, req.GetUserId(), func(sh *shards.Shard, p int32) (err error) {
		res, err = sh.DeleteUser(ctx, p, req.GetUserId(), req.ExpectedVersion)
		return err
	})
	if c := d.s.opts.Cache; c != nil && len(res.SessionHashes) > 0 {
		keys := make([]string, len(res.SessionHashes))
		for i, h := range res.SessionHashes {
			keys[i] = c.SessionKey(h)
		}
		d.s.invalidated(ctx, c.Invalidate(ctx, keys...))
	}
	if err != nil {
		return nil, err
	}
	return &pb.DeleteUserResponse{SessionsDeleted: res.Sessions, ItemsDeleted: res.Items}, nil
}

// listPageBytes bounds the data in one page of a List call, so a page
// always fits a default gRPC client (4 MiB).
const listPageBytes = 1 << 20

// pageEnd says how many of the n rows fetched (page size + 1, to learn
// whether more follow) go into this page: at most size, and past the first
// row no more than listPageBytes of rowBytes in total. more reports whether
// a next page exists.
func pageEnd(n, size int, rowBytes func(i int) int) (end int, more bool) {
	total := 0
	for end = 0; end < n; end++ {
		b := rowBytes(end)
		if end == size || (end > 0 && total+b > listPageBytes) {
			return end, true
		}
		total += b
	}
	return end, false
}

// tokenRandomBytes is the secret part of a session token: 192 bits.
const (
	tokenRandomBytes = 24
	tokenRandomChars = 32 // base64url of 24 bytes, unpadded
)

// newToken returns a session token for partition p and its SHA-256.
func newToken(p int32) (string, []byte) {
	var b [tokenRandomBytes]byte
	rand.Read(b[:]) // never fails: crypto/rand aborts the process instead
	tok := strconv.Itoa(int(p)) + "." + base64.RawURLEncoding.EncodeToString(b[:])
	return tok, hashToken(tok)
}

func hashToken(tok string) []byte {
	h := tokenHash(tok)
	return h[:]
}

// tokenHash is hashToken as an array, which stays on the caller's stack.
func tokenHash(tok string) [sha256.Size]byte {
	// Sum256 only reads its argument: no copy of tok needed.
	return sha256.Sum256(unsafe.Slice(unsafe.StringData(tok), len(tok)))
}

// CreateSession opens a session for an existing user.
func (d *DataService) CreateSession(ctx context.Context, req *pb.CreateSessionRequest) (*pb.CreateSessionResponse, error) {
	data := storedJSON(req.GetDataJson(), true)
	ttl := time.Duration(req.GetTtlSeconds()) * time.Second
	if err := d.s.checkUserSession(ctx, ttl, data); err != nil {
		return nil, err
	}
	var (
		tok  string
		hash []byte
		sess shards.Session
	)
	err := d.s.onUserWrite(ctx, req.GetUserId(), func(sh *shards.Shard, p int32) (err error) {
		tok, hash = newToken(p)
		sess, err = sh.CreateSession(ctx, p, req.GetUserId(), hash, data, ttl)
		return err
	})
	if c := d.s.opts.Cache; c != nil && hash != nil {
		// Nobody can have read the new token yet; this only matters for
		// a "not found" cached by someone who guessed it.
		d.s.invalidated(ctx, c.InvalidateSession(ctx, hash))
	}
	if err != nil {
		return nil, err
	}
	return &pb.CreateSessionResponse{Token: tok, ExpiresAt: timestamppb.New(sess.ExpiresAt)}, nil
}

// checkUserSession holds a user principal's own sessions to what the
// operator allows users: a TTL of at most UserSessionMaxTTL and, when
// creating (data non-nil), data matching UserSessionSchema.
func (s *Server) checkUserSession(ctx context.Context, ttl time.Duration, data []byte) error {
	if p, ok := auth.PrincipalFrom(ctx); !ok || p.Role != auth.RoleUser {
		return nil
	}
	if max := s.opts.UserSessionMaxTTL; ttl > max {
		return invalid("ttl_seconds", "at most %d (%v) for a session a user creates or extends itself; a service may give longer", int64(max/time.Second), max)
	}
	if data != nil && s.userSessionSchema != nil {
		if err := checkValue(s.userSessionSchema, "data_json", data); err != nil {
			var fe *fieldError
			if errors.As(err, &fe) {
				return invalid("data_json", "does not match the user session schema (sessions a user creates itself): %s", fe.msg)
			}
			return err
		}
	}
	return nil
}

// onToken runs fn on the shard of a session token's partition.
func (d *DataService) onToken(ctx context.Context, tok string, fn func(sh *shards.Shard, p int32, hash []byte) error) error {
	p, hash := tokenPartition(tok), hashToken(tok)
	return d.s.onPartition(ctx, p, func(sh *shards.Shard) error { return fn(sh, p, hash) })
}

// onTokenWrite is onToken for a write (see Server.onPartitionWrite).
func (d *DataService) onTokenWrite(ctx context.Context, tok string, fn func(sh *shards.Shard, p int32, hash []byte) error) error {
	p, hash := tokenPartition(tok), hashToken(tok)
	return d.s.onPartitionWrite(ctx, p, func(sh *shards.Shard) error { return fn(sh, p, hash) })
}

// ownSession is called by the session-token handlers with the session's
// owner: a user may only see its own sessions, and another user's session
// looks exactly like one that does not exist.
func ownSession(ctx context.Context, owner string) error {
	p, ok := auth.PrincipalFrom(ctx)
	if !ok || p.Role != auth.RoleUser || p.Subject == owner {
		return nil
	}
	return status.Error(codes.NotFound, "session not found")
}

// userOwnsSession checks, for a user principal, that the session is its
// own before a session-token call changes it (one extra read, users only).
func userOwnsSession(ctx context.Context, sh *shards.Shard, p int32, hash []byte) error {
	if pr, ok := auth.PrincipalFrom(ctx); !ok || pr.Role != auth.RoleUser {
		return nil
	}
	sess, err := sh.GetSession(ctx, p, hash)
	if err != nil {
		return err
	}
	return ownSession(ctx, sess.UserID)
}

// GetSession reads a live session.
func (d *DataService) GetSession(ctx context.Context, req *pb.GetSessionRequest) (*pb.GetSessionResponse, error) {
	if c := d.s.readCache(ctx); c != nil {
		return d.getSessionCached(ctx, c, req.GetToken())
	}
	var sess shards.Session
	err := d.onToken(ctx, req.GetToken(), func(sh *shards.Shard, p int32, hash []byte) (err error) {
		sess, err = sh.GetSession(ctx, p, hash)
		return err
	})
	if err != nil {
		return nil, err
	}
	if err := ownSession(ctx, sess.UserID); err != nil {
		return nil, err
	}
	return &pb.GetSessionResponse{
		UserId:    sess.UserID,
		DataJson:  string(sess.Data),
		ExpiresAt: timestamppb.New(sess.ExpiresAt),
		Version:   sess.Version,
	}, nil
}

// getSessionCached answers GetSession from the cache, loading a miss from
// the session's shard.
func (d *DataService) getSessionCached(ctx context.Context, c *cache.Cache, tok string) (*pb.GetSessionResponse, error) {
	p, sum := tokenPartition(tok), tokenHash(tok)
	ctx, span, traced := d.s.startSpan(ctx, "cache.get_session")
	if traced {
		span.SetAttributes(attrPartition.Int(int(p)))
	}
	e, err := c.GetSession(ctx, sum[:], func(ctx context.Context) (cache.Entry, error) {
		ctx, span, traced := d.s.startSpan(ctx, "cache.load_session")
		if traced {
			span.SetAttributes(attrPartition.Int(int(p)))
		}
		hash := hashToken(tok) // a miss: a shard query follows anyway
		var sess shards.Session
		err := d.s.onPartition(ctx, p, func(sh *shards.Shard) (err error) {
			sess, err = sh.GetSession(ctx, p, hash)
			return err
		})
		if traced {
			endSpan(span, err)
		}
		if err != nil {
			return notFoundEntry(err)
		}
		return sessionEntry(sess), nil
	})
	if traced {
		endSpan(span, err)
	}
	if err != nil {
		return nil, err
	}
	if !e.Found {
		return nil, errSessionNotFound()
	}
	// A user principal sees only its own sessions, cached or not.
	if err := ownSession(ctx, e.Owner); err != nil {
		return nil, err
	}
	// One allocation for the response and its timestamp.
	r := &struct {
		resp    pb.GetSessionResponse
		expires timestamppb.Timestamp
	}{}
	r.expires.Seconds, r.expires.Nanos = unixParts(e.ExpiresAt)
	r.resp.UserId, r.resp.DataJson, r.resp.ExpiresAt, r.resp.Version = e.Owner, e.Value, &r.expires, e.Version
	return &r.resp, nil
}

// invalidateToken drops a session from the cache after a write to it.
func (d *DataService) invalidateToken(ctx context.Context, tok string) {
	if c := d.s.opts.Cache; c != nil {
		d.s.invalidated(ctx, c.InvalidateSession(ctx, hashToken(tok)))
	}
}

// TouchSession extends a live session.
func (d *DataService) TouchSession(ctx context.Context, req *pb.TouchSessionRequest) (*pb.TouchSessionResponse, error) {
	ttl := time.Duration(req.GetTtlSeconds()) * time.Second
	if err := d.s.checkUserSession(ctx, ttl, nil); err != nil {
		return nil, err
	}
	var sess shards.Session
	err := d.onTokenWrite(ctx, req.GetToken(), func(sh *shards.Shard, p int32, hash []byte) (err error) {
		if err := userOwnsSession(ctx, sh, p, hash); err != nil {
			return err
		}
		sess, err = sh.TouchSession(ctx, p, hash, ttl)
		return err
	})
	d.invalidateToken(ctx, req.GetToken())
	if err != nil {
		return nil, err
	}
	return &pb.TouchSessionResponse{ExpiresAt: timestamppb.New(sess.ExpiresAt), Version: sess.Version}, nil
}

// RevokeSession ends a session.
func (d *DataService) RevokeSession(ctx context.Context, req *pb.RevokeSessionRequest) (*pb.RevokeSessionResponse, error) {
	err := d.onTokenWrite(ctx, req.GetToken(), func(sh *shards.Shard, p int32, hash []byte) error {
		if err := userOwnsSession(ctx, sh, p, hash); err != nil {
			return err
		}
		return sh.RevokeSession(ctx, p, hash)
	})
	d.invalidateToken(ctx, req.GetToken())
	if err != nil {
		return nil, err
	}
	return &pb.RevokeSessionResponse{}, nil
}

// ListSessions pages through a user's live sessions.
func (d *DataService) ListSessions(ctx context.Context, req *pb.ListSessionsRequest) (*pb.ListSessionsResponse, error) {
	size := pageSize(req.GetPageSize())
	after, err := decodeSessionPageToken("page_token", req.GetPageToken())
	if err != nil {
		return nil, err
	}
	var list []shards.Session
	err = d.s.onUser(ctx, req.GetUserId(), func(sh *shards.Shard, p int32) (err error) {
		list, err = sh.ListSessions(ctx, p, req.GetUserId(), after, size+1)
		return err
	})
	if err != nil {
		return nil, err
	}
	end, more := pageEnd(len(list), size, func(i int) int { return len(list[i].Data) })
	resp := &pb.ListSessionsResponse{Sessions: make([]*pb.SessionInfo, end)}
	for i, s := range list[:end] {
		resp.Sessions[i] = &pb.SessionInfo{
			SessionId: hex.EncodeToString(s.TokenHash),
			DataJson:  string(s.Data),
			CreatedAt: timestamppb.New(s.CreatedAt),
			ExpiresAt: timestamppb.New(s.ExpiresAt),
			Version:   s.Version,
		}
	}
	if more {
		last := list[end-1]
		resp.NextPageToken = encodeSessionPageToken(shards.SessionKey{CreatedAt: last.CreatedAt, TokenHash: last.TokenHash})
	}
	return resp, nil
}

func itemToPB(it shards.Item) *pb.Item {
	return &pb.Item{
		UserId:     it.UserID,
		Collection: it.Collection,
		Key:        it.Key,
		ValueJson:  string(it.Value),
		Version:    it.Version,
		UpdatedAt:  timestamppb.New(it.UpdatedAt),
	}
}

// PutItem creates or replaces one document.
func (d *DataService) PutItem(ctx context.Context, req *pb.PutItemRequest) (*pb.PutItemResponse, error) {
	value := storedJSON(req.GetValueJson(), false)
	var v int64
	err := d.s.onUserWrite(ctx, req.GetUserId(), func(sh *shards.Shard, p int32) (err error) {
		v, err = sh.PutItem(ctx, p, req.GetUserId(), req.GetCollection(), req.GetKey(), value, req.ExpectedVersion)
		return err
	})
	if err != nil {
		return nil, err
	}
	return &pb.PutItemResponse{Version: v}, nil
}

// GetItem reads one document.
func (d *DataService) GetItem(ctx context.Context, req *pb.GetItemRequest) (*pb.GetItemResponse, error) {
	var it shards.Item
	err := d.s.onUser(ctx, req.GetUserId(), func(sh *shards.Shard, p int32) (err error) {
		it, err = sh.GetItem(ctx, p, req.GetUserId(), req.GetCollection(), req.GetKey())
		return err
	})
	if err != nil {
		return nil, err
	}
	return &pb.GetItemResponse{Item: itemToPB(it)}, nil
}

// DeleteItem removes one document.
func (d *DataService) DeleteItem(ctx context.Context, req *pb.DeleteItemRequest) (*pb.DeleteItemResponse, error) {
	err := d.s.onUserWrite(ctx, req.GetUserId(), func(sh *shards.Shard, p int32) error {
		return sh.DeleteItem(ctx, p, req.GetUserId(), req.GetCollection(), req.GetKey(), req.ExpectedVersion)
	})
	if err != nil {
		return nil, err
	}
	return &pb.DeleteItemResponse{}, nil
}

// ListItems pages through one collection of a user in key order.
func (d *DataService) ListItems(ctx context.Context, req *pb.ListItemsRequest) (*pb.ListItemsResponse, error) {
	size := pageSize(req.GetPageSize())
	after, err := pageTokenKey("page_token", req.GetPageToken())
	if err != nil {
		return nil, err
	}
	var list []shards.Item
	err = d.s.onUser(ctx, req.GetUserId(), func(sh *shards.Shard, p int32) (err error) {
		// One extra row says whether another page follows.
		list, err = sh.ListItems(ctx, p, req.GetUserId(), req.GetCollection(), req.GetPrefix(), after, size+1)
		return err
	})
	if err != nil {
		return nil, err
	}
	end, more := pageEnd(len(list), size, func(i int) int { return len(list[i].Key) + len(list[i].Value) })
	resp := &pb.ListItemsResponse{Items: make([]*pb.Item, end)}
	for i, it := range list[:end] {
		resp.Items[i] = itemToPB(it)
	}
	if more {
		resp.NextPageToken = encodePageToken(list[end-1].Key)
	}
	return resp, nil
}

// GetConfig reads one global config value.
func (d *DataService) GetConfig(ctx context.Context, req *pb.GetConfigRequest) (*pb.GetConfigResponse, error) {
	ns, key := req.GetNamespace(), req.GetKey()
	if c := d.s.readCache(ctx); c != nil {
		ctx, span, traced := d.s.startSpan(ctx, "cache.get_config")
		e, err := c.GetConfig(ctx, ns, key, func(ctx context.Context) (cache.Entry, error) {
			ctx, span, traced := d.s.startSpan(ctx, "cache.load_config")
			ce, err := d.s.catalog.GetConfig(ctx, ns, key)
			if traced {
				endSpan(span, err)
			}
			if err != nil {
				return notFoundEntry(err)
			}
			return configEntry(ce), nil
		})
		if traced {
			endSpan(span, err)
		}
		if err != nil {
			return nil, err
		}
		if !e.Found {
			return nil, errConfigNotFound(ns, key)
		}
		return &pb.GetConfigResponse{ValueJson: e.Value, Version: e.Version, UpdatedAt: timestamppb.New(e.UpdatedAt)}, nil
	}
	e, err := d.s.catalog.GetConfig(ctx, ns, key)
	if err != nil {
		return nil, err
	}
	return &pb.GetConfigResponse{ValueJson: string(e.Value), Version: e.Version, UpdatedAt: timestamppb.New(e.UpdatedAt)}, nil
}

// SetConfig creates or replaces one global config value.
func (d *DataService) SetConfig(ctx context.Context, req *pb.SetConfigRequest) (*pb.SetConfigResponse, error) {
	value := storedJSON(req.GetValueJson(), false)
	v, err := d.s.setConfig(ctx, req.GetNamespace(), req.GetKey(), value, req.ExpectedVersion)
	d.invalidateConfig(ctx, req.GetNamespace(), req.GetKey())
	if err != nil {
		return nil, err
	}
	d.s.wake(events.ConfigWake)
	return &pb.SetConfigResponse{Version: v}, nil
}

// DeleteConfig removes one global config value.
func (d *DataService) DeleteConfig(ctx context.Context, req *pb.DeleteConfigRequest) (*pb.DeleteConfigResponse, error) {
	err := d.s.catalog.DeleteConfig(ctx, req.GetNamespace(), req.GetKey(), req.ExpectedVersion)
	d.invalidateConfig(ctx, req.GetNamespace(), req.GetKey())
	if err != nil {
		return nil, err
	}
	d.s.wake(events.ConfigWake)
	return &pb.DeleteConfigResponse{}, nil
}

// invalidateConfig drops a config value and its namespace's list from the
// cache after a write to it.
func (d *DataService) invalidateConfig(ctx context.Context, namespace, key string) {
	if c := d.s.opts.Cache; c != nil {
		d.s.invalidated(ctx, c.InvalidateConfig(ctx, namespace, key))
	}
}

// ListConfig pages through a namespace.
func (d *DataService) ListConfig(ctx context.Context, req *pb.ListConfigRequest) (*pb.ListConfigResponse, error) {
	size := pageSize(req.GetPageSize())
	after, err := pageTokenKey("page_token", req.GetPageToken())
	if err != nil {
		return nil, err
	}
	list, cached, err := d.listConfigCached(ctx, req.GetNamespace(), after, size+1)
	if err != nil {
		return nil, err
	}
	if !cached {
		list, err = d.s.catalog.ListConfig(ctx, req.GetNamespace(), after, size+1)
		if err != nil {
			return nil, err
		}
	}
	end, more := pageEnd(len(list), size, func(i int) int { return len(list[i].Key) + len(list[i].Value) })
	resp := &pb.ListConfigResponse{Entries: make([]*pb.ConfigEntry, end)}
	for i, e := range list[:end] {
		resp.Entries[i] = &pb.ConfigEntry{
			Namespace: e.Namespace, Key: e.Key, ValueJson: string(e.Value),
			Version: e.Version, UpdatedAt: timestamppb.New(e.UpdatedAt),
		}
	}
	if more {
		resp.NextPageToken = encodePageToken(list[end-1].Key)
	}
	return resp, nil
}

// listConfigCached returns a ListConfig page from the cached namespace;
// cached is false when the cache cannot answer (none, no-cache, a
// namespace too large to cache, or a page token it cannot place).
func (d *DataService) listConfigCached(ctx context.Context, namespace, after string, limit int) (list []catalog.ConfigEntry, cached bool, err error) {
	c := d.s.readCache(ctx)
	if c == nil {
		return nil, false, nil
	}
	e, err := c.ListConfig(ctx, namespace, func(ctx context.Context) (cache.Entry, error) {
		// One more than the cache keeps tells it the namespace is too large.
		all, err := d.s.catalog.ListConfig(ctx, namespace, "", c.MaxListEntries()+1)
		if err != nil {
			return cache.Entry{}, err
		}
		e := cache.Entry{List: make([]cache.Entry, len(all))}
		for i, ce := range all {
			e.List[i] = configEntry(ce)
		}
		return e, nil
	})
	if err != nil {
		return nil, false, err
	}
	list, ok := cachedConfigPage(e, namespace, after, limit)
	return list, ok, nil
}
