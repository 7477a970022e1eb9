package auth

import (
	"context"
	"crypto/sha256"
	"maps"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
)

// authenticate finds the principal of a call. With no verifier every call
// is an anonymous admin (dev and loopback without auth, as before).
func (v *Verifier) authenticate(ctx context.Context) (*Principal, error) {
	if v == nil {
		return anonymous(ctx), nil
	}
	// One header read, not a copy of all of them (FromIncomingContext).
	vals := metadata.ValueFromIncomingContext(ctx, "authorization")
	if len(vals) == 0 {
		if v.opts.AllowAnonymous {
			return v.peers.get(ctx).anon, nil
		}
		return nil, status.Error(codes.Unauthenticated, "missing bearer token")
	}
	if len(vals) > 1 {
		return nil, status.Error(codes.Unauthenticated, "more than one authorization header")
	}
	raw, ok := parseBearer(vals[0])
	if !ok {
		return nil, status.Error(codes.Unauthenticated, "authorization is not \"Bearer <token>\"")
	}
	if v.throttle == nil {
		p, err := v.Verify(ctx, raw)
		if err != nil {
			return nil, status.Error(codes.Unauthenticated, "invalid token: "+err.Error())
		}
		return p, nil
	}
	host := v.peers.get(ctx).host
	if wait, blocked := v.throttle.blocked(host); blocked {
		// Tokens verified before still work; nothing new is checked.
		if p, ok := v.cached(ctx, sha256.Sum256([]byte(raw)), v.now()); ok {
			return p, nil
		}
		return nil, v.throttle.refuse(ctx, wait)
	}
	p, err := v.Verify(ctx, raw)
	if err != nil {
		v.throttle.failed(host)
		return nil, status.Error(codes.Unauthenticated, "invalid token: "+err.Error())
	}
	return p, nil
}

// PeerHost is the caller's IP address ("" when unknown): what failed tokens
// are throttled by, and what names an anonymous caller.
func PeerHost(ctx context.Context) string {
	pr, ok := peer.FromContext(ctx)
	if !ok || pr.Addr == nil {
		return ""
	}
	host := pr.Addr.String()
	if i := strings.LastIndexByte(host, ':'); i > 0 {
		host = host[:i]
	}
	return host
}

// anonymous is the principal of a call without a token where that is
// allowed; its rate-limit key is the peer's IP.
func anonymous(ctx context.Context) *Principal {
	key := "anon"
	if host := PeerHost(ctx); host != "" {
		key = "anon:" + host
	}
	return &Principal{Role: RoleAdmin, Anonymous: true, Subject: "", key: key}
}

// peerCache remembers, per caller IP, its PeerHost and its anonymous
// principal (immutable, like the verified-token cache's principals), so a
// call neither formats its peer's address nor allocates a principal again:
// together most of an anonymous call's authentication. Readers take no
// lock: the map is replaced, never changed, and holds at most maxPeers
// callers (others are served as before, without it).
type peerCache struct {
	mu sync.Mutex // serializes writers
	m  atomic.Pointer[map[netip.Addr]*peerEntry]
}

type peerEntry struct {
	host string     // PeerHost
	anon *Principal // anonymous
}

const maxPeers = 4096

func (c *peerCache) get(ctx context.Context) *peerEntry {
	pr, _ := peer.FromContext(ctx)
	var tcp *net.TCPAddr
	if pr != nil {
		tcp, _ = pr.Addr.(*net.TCPAddr)
	}
	ip, ok := netip.Addr{}, false
	if tcp != nil && tcp.Zone == "" {
		ip, ok = netip.AddrFromSlice(tcp.IP)
	}
	if !ok { // not TCP (a pipe in tests, a Unix socket): not cached
		return newPeerEntry(ctx)
	}
	if m := c.m.Load(); m != nil {
		if e, ok := (*m)[ip]; ok {
			return e
		}
	}
	e := newPeerEntry(ctx)
	c.mu.Lock()
	defer c.mu.Unlock()
	old := c.m.Load()
	if old != nil && len(*old) >= maxPeers {
		return e
	}
	m := make(map[netip.Addr]*peerEntry, 1)
	if old != nil {
		m = maps.Clone(*old)
	}
	m[ip] = e
	c.m.Store(&m)
	return e
}

func newPeerEntry(ctx context.Context) *peerEntry {
	return &peerEntry{host: PeerHost(ctx), anon: anonymous(ctx)}
}

// Methods reachable without any principal: load balancers probe health.
func publicMethod(method string) bool {
	return strings.HasPrefix(method, "/grpc.health.v1.Health/")
}

const (
	dataPrefix  = "/" + "shardgate.v1.DataService" + "/"
	adminPrefix = "/" + "shardgate.v1.AdminService" + "/"
)

// Session-token methods: the handler checks that the session is the user's.
var sessionTokenMethods = map[string]bool{
	pb.DataService_GetSession_FullMethodName:    true,
	pb.DataService_TouchSession_FullMethodName:  true,
	pb.DataService_RevokeSession_FullMethodName: true,
}

// Config methods a user may call: config is global and read by clients.
var userConfigReads = map[string]bool{
	pb.DataService_GetConfig_FullMethodName:  true,
	pb.DataService_ListConfig_FullMethodName: true,
}

// Config methods of DataService that change global state: service or admin.
var configWrites = map[string]bool{
	pb.DataService_SetConfig_FullMethodName:    true,
	pb.DataService_DeleteConfig_FullMethodName: true,
}

var errDenied = status.Error(codes.PermissionDenied, "permission denied")

// authorize decides whether p may call method with req (nil for a stream
// before its first message).
//
//   - admin: everything.
//   - service: all of DataService and reflection; AdminService's read-only
//     GetConfigSchema; nothing else of AdminService.
//   - user: DataService calls whose request names its own user_id
//     (GetUserId() == sub), the session-token calls (the handler checks
//     the session's owner), GetConfig and ListConfig; nothing else.
func authorize(p *Principal, method string, req any) error {
	switch p.Role {
	case RoleAdmin:
		return nil
	case RoleService:
		if strings.HasPrefix(method, adminPrefix) {
			if method == pb.AdminService_GetConfigSchema_FullMethodName {
				return nil
			}
			return errDenied
		}
		return nil
	case RoleUser:
		if !strings.HasPrefix(method, dataPrefix) || configWrites[method] {
			return errDenied
		}
		if sessionTokenMethods[method] || userConfigReads[method] {
			return nil
		}
		if r, ok := req.(interface{ GetUserId() string }); ok {
			if r.GetUserId() != p.Subject {
				return errDenied
			}
			return nil
		}
		return errDenied
	}
	return errDenied
}

// UnaryServerInterceptor authenticates and authorizes each unary call and
// hands the handler a context carrying the caller's Principal. With a nil
// v every call is an anonymous admin. grpc.health.v1 is open to all.
func UnaryServerInterceptor(v *Verifier) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		if publicMethod(info.FullMethod) {
			return h(ctx, req)
		}
		p, err := v.authenticate(ctx)
		if err != nil {
			return nil, err
		}
		if err := authorize(p, info.FullMethod, req); err != nil {
			return nil, err
		}
		return h(withPrincipal(ctx, p), req)
	}
}

// watchRequest is what a Watch-like stream request offers for scoping.
type watchRequest interface {
	GetUserIds() []string
	GetPartitions() []uint32
}

// StreamServerInterceptor authenticates each stream, and for user
// principals checks its requests: a stream whose request names users
// (Watch) may only follow the caller's own user_id, and never whole
// partitions; any other request must pass authorize like a unary call.
func StreamServerInterceptor(v *Verifier) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
		if publicMethod(info.FullMethod) {
			return h(srv, ss)
		}
		p, err := v.authenticate(ss.Context())
		if err != nil {
			return err
		}
		// A stream lives no longer than its token: past exp the caller must
		// come back with a fresh one (Watch resumes from its cursor).
		if !p.Expires.IsZero() {
			ctx, cancel := context.WithDeadlineCause(ss.Context(), p.Expires, errStreamTokenExpired)
			defer cancel()
			ss = &contextStream{ServerStream: ss, ctx: ctx}
		}
		if p.Role != RoleUser {
			if err := authorize(p, info.FullMethod, nil); err != nil {
				return err
			}
			return h(srv, &principalStream{ServerStream: ss, ctx: withPrincipal(ss.Context(), p)})
		}
		if !strings.HasPrefix(info.FullMethod, dataPrefix) {
			return errDenied
		}
		return h(srv, &principalStream{ServerStream: ss, ctx: withPrincipal(ss.Context(), p), method: info.FullMethod, user: p})
	}
}

// errStreamTokenExpired ends a stream whose token expired while it ran.
var errStreamTokenExpired = status.Error(codes.Unauthenticated, "token expired during the stream; reconnect with a fresh token (Watch: resume from the last cursor)")

// contextStream is a server stream with another context.
type contextStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s *contextStream) Context() context.Context { return s.ctx }

// principalStream carries the principal, and for users checks every
// received message.
type principalStream struct {
	grpc.ServerStream
	ctx    context.Context
	method string
	user   *Principal // set for user principals
}

func (s *principalStream) Context() context.Context { return s.ctx }

func (s *principalStream) RecvMsg(m any) error {
	if err := s.ServerStream.RecvMsg(m); err != nil {
		return err
	}
	if s.user == nil {
		return nil
	}
	if w, ok := m.(watchRequest); ok {
		ids := w.GetUserIds()
		if len(w.GetPartitions()) > 0 || len(ids) != 1 || ids[0] != s.user.Subject {
			return errDenied
		}
		return nil
	}
	return authorize(s.user, s.method, m)
}

// LimitKey names the caller of ctx's call in rate-limit keys (a
// ratelimit.KeyFunc): its role and subject, or for anonymous calls its
// address. Public methods carry no principal and are not limited.
func LimitKey(ctx context.Context) (string, bool) {
	p, ok := PrincipalFrom(ctx)
	if !ok {
		return "", false
	}
	return p.key, true
}
