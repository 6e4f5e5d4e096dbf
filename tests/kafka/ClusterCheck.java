// Readiness probe for scripts/kafka.sh, run on the Kafka jars it fetched (kafka-clients' Admin).
// It asks the brokers, never sleeps blindly:
//
//   ClusterCheck brokers <bootstrap> <timeout-ms> <id>...
//       every id is a live broker of the cluster (DescribeCluster) and answers a request sent
//       to it alone (DescribeConfigs of its own broker resource goes to that broker only).
//   ClusterCheck topic <bootstrap> <timeout-ms> <topic> [full-isr]
//       every partition of the topic has a leader (and, with full-isr, all replicas in sync).
//
// Exit 0 when ready, 1 on timeout (with the last reason on stderr), 2 on bad arguments.

import java.util.ArrayList;
import java.util.Collection;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.Set;
import java.util.TreeSet;
import java.util.concurrent.TimeUnit;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.TopicDescription;
import org.apache.kafka.common.Node;
import org.apache.kafka.common.TopicPartitionInfo;
import org.apache.kafka.common.config.ConfigResource;

public class ClusterCheck {
    public static void main(String[] args) throws Exception {
        if (args.length < 4 || !(args[0].equals("brokers") || args[0].equals("topic"))) {
            System.err.println("usage: ClusterCheck brokers <bootstrap> <timeout-ms> <id>...");
            System.err.println("       ClusterCheck topic <bootstrap> <timeout-ms> <topic> [full-isr]");
            System.exit(2);
        }
        long deadline = System.nanoTime() + TimeUnit.MILLISECONDS.toNanos(Long.parseLong(args[2]));
        Properties props = new Properties();
        props.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, args[1]);
        props.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, "3000");
        props.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, "4000");
        props.put(AdminClientConfig.RECONNECT_BACKOFF_MS_CONFIG, "100");
        props.put(AdminClientConfig.RECONNECT_BACKOFF_MAX_MS_CONFIG, "500");
        props.put(AdminClientConfig.RETRY_BACKOFF_MS_CONFIG, "100");
        String reason = "no answer yet";
        try (Admin admin = Admin.create(props)) {
            while (System.nanoTime() < deadline) {
                try {
                    String missing = args[0].equals("brokers")
                        ? brokersMissing(admin, args)
                        : topicMissing(admin, args);
                    if (missing == null) {
                        return;
                    }
                    reason = missing;
                } catch (Exception e) {
                    Throwable cause = e.getCause() != null ? e.getCause() : e;
                    reason = cause.getClass().getSimpleName() + ": " + cause.getMessage();
                }
                Thread.sleep(200);
            }
        }
        System.err.println("not ready: " + reason);
        System.exit(1);
    }

    /** Null when every wanted broker is live and answers, else what is missing. */
    static String brokersMissing(Admin admin, String[] args) throws Exception {
        Set<Integer> live = new TreeSet<>();
        for (Node n : admin.describeCluster().nodes().get(4, TimeUnit.SECONDS)) {
            live.add(n.id());
        }
        List<Integer> absent = new ArrayList<>();
        List<ConfigResource> own = new ArrayList<>();
        for (int i = 3; i < args.length; i++) {
            int id = Integer.parseInt(args[i]);
            if (!live.contains(id)) {
                absent.add(id);
            }
            own.add(new ConfigResource(ConfigResource.Type.BROKER, Integer.toString(id)));
        }
        if (!absent.isEmpty()) {
            return "brokers " + absent + " not registered (live: " + live + ")";
        }
        for (ConfigResource r : own) {
            admin.describeConfigs(List.of(r)).all().get(4, TimeUnit.SECONDS);
        }
        return null;
    }

    /** Null when every partition has a leader (and full ISR if asked), else the first gap. */
    static String topicMissing(Admin admin, String[] args) throws Exception {
        String topic = args[3];
        boolean fullIsr = args.length > 4 && args[4].equals("full-isr");
        Map<String, TopicDescription> d =
            admin.describeTopics(List.of(topic)).allTopicNames().get(4, TimeUnit.SECONDS);
        Collection<TopicPartitionInfo> parts = d.get(topic).partitions();
        for (TopicPartitionInfo p : parts) {
            if (p.leader() == null || p.leader().isEmpty()) {
                return topic + "-" + p.partition() + " has no leader";
            }
            if (fullIsr && p.isr().size() < p.replicas().size()) {
                return topic + "-" + p.partition() + " isr " + p.isr().size() + " of " + p.replicas().size();
            }
        }
        return null;
    }
}
