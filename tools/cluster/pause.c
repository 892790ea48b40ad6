/*
 * The infrastructure ("pause") container of every pod, built by
 * tools/cluster/images.sh as registry.k8s.io/pause because the cluster cannot
 * pull images. It holds the pod's namespaces open and does nothing else:
 *
 *   - SIGINT and SIGTERM end it with exit status 0, so a pod stops cleanly;
 *   - as PID 1 of a pod that shares its PID namespace it reaps orphaned
 *     children (SIGCHLD, waitpid(-1, WNOHANG) until none is left);
 *   - otherwise it sleeps in pause() forever.
 *
 * Build: gcc -static -O2 -o pause pause.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define VERSION "3.10.1-xdplb"

static void on_terminate(int sig)
{
    /* Only async-signal-safe calls here. */
    static const char msg[] = "pause: shutting down\n";
    (void)sig;
    ssize_t unused = write(STDERR_FILENO, msg, sizeof(msg) - 1);
    (void)unused;
    _exit(0);
}

static void on_child(int sig)
{
    int saved_errno = errno;
    (void)sig;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
    errno = saved_errno;
}

static void install(int sig, void (*handler)(int))
{
    struct sigaction sa;

    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART | (sig == SIGCHLD ? SA_NOCLDSTOP : 0);
    if (sigaction(sig, &sa, NULL) < 0) {
        perror("pause: sigaction");
        _exit(1);
    }
}

int main(int argc, char **argv)
{
    if (argc > 1 && (strcmp(argv[1], "-v") == 0 || strcmp(argv[1], "--version") == 0)) {
        printf("pause %s\n", VERSION);
        return 0;
    }
    if (getpid() != 1)
        fprintf(stderr, "pause: warning: not running as PID 1\n");

    install(SIGINT, on_terminate);
    install(SIGTERM, on_terminate);
    install(SIGCHLD, on_child);

    for (;;)
        pause();
    /* not reached */
    return 42;
}
