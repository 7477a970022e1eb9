// Package tlsconfig builds the server's TLS 1.3 configuration from PEM files
// and reloads them when they change, so certificates rotate without a
// restart.
package tlsconfig

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"
)

// Files name the PEM files of the server's TLS identity.
type Files struct {
	CertFile string // certificate chain
	KeyFile  string // its private key
	// ClientCAFile, when set, turns on mutual TLS: clients must present a
	// certificate signed by one of these CAs.
	ClientCAFile string
}

// certReloader serves the certificate (and client CAs) from files and
// reloads them when a file's modification time or size changes, so
// rotating a certificate needs no restart. A reload that fails (a
// half-written file) keeps the previous identity and is retried on the
// next handshake.
type certReloader struct {
	files Files
	log   *slog.Logger

	mu      sync.Mutex
	stamp   string // mtimes and sizes of the files last loaded
	checked time.Time
	conf    *tls.Config
}

// New returns a TLS 1.3-only server configuration that reloads its files
// when they change.
func New(f Files, log *slog.Logger) (*tls.Config, error) {
	if f.CertFile == "" || f.KeyFile == "" {
		return nil, errors.New("TLS needs both a certificate and a key file")
	}
	if log == nil {
		log = slog.Default()
	}
	r := &certReloader{files: f, log: log}
	if err := r.load(); err != nil {
		return nil, err
	}
	return &tls.Config{
		MinVersion:         tls.VersionTLS13,
		GetConfigForClient: r.configForClient,
	}, nil
}

// stampOf fingerprints the files by modification time and size.
func (r *certReloader) stampOf() (string, error) {
	var s string
	for _, name := range []string{r.files.CertFile, r.files.KeyFile, r.files.ClientCAFile} {
		if name == "" {
			continue
		}
		fi, err := os.Stat(name)
		if err != nil {
			return "", err
		}
		s += fmt.Sprintf("%d/%d;", fi.ModTime().UnixNano(), fi.Size())
	}
	return s, nil
}

func (r *certReloader) load() error {
	stamp, err := r.stampOf()
	if err != nil {
		return fmt.Errorf("TLS files: %w", err)
	}
	cert, err := tls.LoadX509KeyPair(r.files.CertFile, r.files.KeyFile)
	if err != nil {
		return fmt.Errorf("TLS certificate: %w", err)
	}
	conf := &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
	}
	if r.files.ClientCAFile != "" {
		pem, err := os.ReadFile(r.files.ClientCAFile)
		if err != nil {
			return fmt.Errorf("TLS client CA: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return fmt.Errorf("TLS client CA %s: no certificates", r.files.ClientCAFile)
		}
		conf.ClientCAs = pool
		conf.ClientAuth = tls.RequireAndVerifyClientCert
	}
	r.mu.Lock()
	r.conf, r.stamp = conf, stamp
	r.mu.Unlock()
	return nil
}

// configForClient answers each handshake with the current files, checking
// them at most once a second.
func (r *certReloader) configForClient(*tls.ClientHelloInfo) (*tls.Config, error) {
	r.mu.Lock()
	conf, stamp := r.conf, r.stamp
	check := time.Since(r.checked) >= time.Second
	if check {
		r.checked = time.Now()
	}
	r.mu.Unlock()
	if !check {
		return conf, nil
	}
	if now, err := r.stampOf(); err == nil && now != stamp {
		if err := r.load(); err != nil {
			r.log.Warn("TLS files changed but cannot be loaded; keeping the previous ones", "err", err)
		} else {
			r.log.Info("TLS files reloaded", "cert", r.files.CertFile)
		}
		r.mu.Lock()
		conf = r.conf
		r.mu.Unlock()
	}
	return conf, nil
}
